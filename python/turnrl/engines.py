"""Generation engines for the policy being trained, and the agent that uses them.

An engine turns chats into completions: ``engine.generate(conversations,
tools) -> list[Completion]`` (or plain strings), one raw completion text per
chat (the tokens after the chat template's generation prompt, up to and
without the end-of-turn token), whether the generation was cut at the
token limit, and the token ids it sampled; or, in one chat's place, the
exception that chat alone gets (:class:`turnrl.envs.ContextLengthExceeded`
when its prompt leaves the model's context no room for a reply). Three
engines share that interface:

* :class:`TransformersEngine`: the training model itself (``model.generate``),
  so rollouts always come from the current weights; for small models, tests
  and CPUs.
* :class:`VLLMEngine`: vLLM's offline ``LLM`` on the same base weights, with
  the trained LoRA adapter loaded after each update (:meth:`VLLMEngine.load_adapter`).
* :class:`ServerEngine`: a vLLM server elsewhere (its own GPUs, shared by
  every rank), sampled through its completions API, with each new adapter
  registered at it (:meth:`ServerEngine.load_adapter`).

:class:`EngineAgent` makes an engine a :func:`turnrl.envs.run_episode`
agent. Episodes run on threads (:func:`turnrl.collect.collect_rollouts`)
each ask for one completion at a time; the agent batches the requests that
arrive while a generation is running into the next ``generate`` call.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import json
import math
import operator
import os
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol

from turnrl.envs.agents import (
    AgentError,
    ContextLengthExceeded,
    _check_min_p,
    _check_repetition_penalty,
    _check_temperature,
    _check_top_k,
    _check_top_p,
    reply_from_text,
)
from turnrl.exceptions import InvalidInputError
from turnrl.train import _base_model, template_messages

__all__ = [
    "Completion",
    "Engine",
    "EngineAgent",
    "ServerEngine",
    "TransformersEngine",
    "VLLMEngine",
]

Chat = Sequence[Mapping[str, Any]]
Tools = Sequence[Mapping[str, Any]] | None


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generation: its raw text, whether it stopped at the token limit,
    the end token it stopped on when that was not the tokenizer's ``eos_token``
    (Llama 3's ``<|eom_id|>``; None otherwise), which training appends, the
    token ids sampled (the end token included; None when unknown), and the
    sampler's log-probability of each of them (None when unknown).

    Training uses ``token_ids`` instead of encoding the text again, which can
    give other ids: a sampler may draw ``"\n"`` twice where the tokenizer
    encodes ``"\n\n"`` as one token. ``logprobs`` measure how far the sampler
    (vLLM's kernels, in bfloat16) is from the trained model on the same
    tokens, and correct for it (:attr:`turnrl.train.GTPOConfig.rollout_correction`).
    """

    text: str
    truncated: bool = False
    stop: str | None = None
    token_ids: tuple[int, ...] | None = None
    logprobs: tuple[float, ...] | None = None


class Engine(Protocol):
    """Anything that completes a batch of chats."""

    def generate(self, conversations: Sequence[Chat], tools: Tools = None) -> Sequence[Any]:
        """One :class:`Completion` (or raw text) per chat, without the end-of-turn token.

        An exception instance in a chat's place is that chat's answer alone:
        :class:`EngineAgent` raises it in that chat's episode, and the others
        get their completions (:class:`turnrl.envs.ContextLengthExceeded` for a
        chat that no longer fits the model's context ends its episode). An
        exception raised by ``generate`` fails every chat of the batch."""
        ...


class TransformersEngine:
    """Sampling from a Hugging Face causal LM (a PEFT model included) with ``generate``.

    Chats are rendered with the tokenizer's chat template
    (``chat_template_kwargs`` as for training), left-padded into one batch,
    and sampled with ``temperature``, ``top_p``, ``top_k`` and ``min_p``
    (greedy at temperature 0; ``top_k`` None or 0: off; ``min_p`` 0: off),
    and ``repetition_penalty`` (1: off), which applies at temperature 0 too
    (greedy takes the likeliest token of the penalised logits, as vLLM's).
    Special tokens stay in the text (tool-call tags can be special tokens);
    the completion stops before the tokenizer's end-of-turn (``eos_token``),
    the pad token or an end token of the model's generation config. Nothing
    else of the model's generation config applies (no repetition penalty,
    top-k or min-p unless asked for): rollouts come from the softmax the
    loss models. The
    model is put in eval mode while generating (no dropout) and back in its
    mode after.

    ``cache_implementation="static"`` (as TRL's ``cache_implementation``)
    gives ``generate`` a static KV cache, which transformers compiles
    (``torch.compile``, CUDA graphs) on a GPU: eager decoding waits on
    kernel launches, the more so with a LoRA adapter on every linear layer,
    and compiled it ran 2.8-4.4x faster on an H100
    (``benches/bench_generate.py``). The first call compiles (about two
    minutes for a 4B model), and so does the first call with another batch
    size; the compiled decoder is kept on the model. transformers keeps the
    cache as long as the longest call so far (prompt plus
    ``max_new_tokens``), for every row of a batch. Any of transformers'
    cache implementations may be named; the offloaded ones need the model on
    CUDA.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        cache_implementation: str | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        temperature = _check_temperature(temperature)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = _check_top_p(top_p)
        self.top_k = _checked_top_k(top_k)
        """Sampling keeps the ``top_k`` likeliest tokens only (None: all)."""
        self.min_p = _check_min_p(min_p)
        """Sampling keeps the tokens at least ``min_p`` times as likely as the
        likeliest (0: all)."""
        self.repetition_penalty = _check_repetition_penalty(repetition_penalty)
        """The penalty on the tokens already in the prompt or the reply (1: none)."""
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.cache_implementation = _checked_cache_implementation(cache_implementation)

    def with_temperature(self, temperature: float) -> TransformersEngine:
        """The same engine on the same model, sampling at ``temperature`` (0: greedy);
        for evaluating the policy being trained as it is trained."""
        return TransformersEngine(
            self.model,
            self.tokenizer,
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            chat_template_kwargs=self.chat_template_kwargs,
            cache_implementation=self.cache_implementation,
        )

    def prompt(self, conversation: Chat, tools: Tools = None) -> str:
        """The text the model is given for ``conversation``."""
        return _render_prompt(self.tokenizer, conversation, tools, self.chat_template_kwargs)

    def stop_ids(self) -> set[int]:
        """Token ids that end a completion."""
        tok = self.tokenizer
        stops = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(configured, int):
            stops.add(configured)
        elif configured is not None:
            stops.update(int(i) for i in configured)
        return stops

    def generate(self, conversations: Sequence[Chat], tools: Tools = None) -> list[Completion]:
        """Sample one completion per chat, in one padded batch."""
        if _is_static_cache(self.cache_implementation):
            # torch keeps the CUDA graphs of a compiled model per thread, and
            # EngineAgent's leading thread changes from batch to batch (its
            # threads are new every step): one thread runs every static-cache
            # generate, so the graphs are recorded once, in one memory pool.
            # A generate asked from that thread (from inside a model's
            # generate) runs there: queued behind itself it would wait for ever.
            if not getattr(_on_generation_thread, "yes", False):
                return _generation_thread().submit(self._generate, conversations, tools).result()
        return self._generate(conversations, tools)

    def _generate(self, conversations: Sequence[Chat], tools: Tools) -> list[Completion]:
        import torch
        from transformers import GenerationConfig

        if not conversations:
            return []
        tok = self.tokenizer
        stops = self.stop_ids()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        encoded = [_prompt_ids(tok, c, tools, self.chat_template_kwargs) for c in conversations]
        width = max(len(e) for e in encoded)
        device = next(self.model.parameters()).device
        if "offloaded" in (self.cache_implementation or "") and device.type != "cuda":
            # transformers moves the cache between CUDA streams; anywhere else
            # generate fails inside with a CUDA error.
            raise InvalidInputError(
                f"cache_implementation {self.cache_implementation!r} needs the model on CUDA "
                f"(it offloads the cache from the GPU); the model is on {device}"
            )
        ids = torch.full((len(encoded), width), int(pad), dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, width - len(e) :] = torch.tensor(e, dtype=torch.long)
            attention[row, width - len(e) :] = 1
        sampling: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            # top_k=0 when off: transformers' own default would keep the top 50 only.
            sampling.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
            if self.min_p:
                sampling["min_p"] = self.min_p
        if self.repetition_penalty != 1:
            # Greedy decoding takes it too (it reshapes the logits, as vLLM's).
            sampling["repetition_penalty"] = self.repetition_penalty
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            eos_token_id=sorted(stops) or None,
            pad_token_id=int(pad),
            cache_implementation=self.cache_implementation,
            **sampling,
        )
        # generate fills whatever the config leaves unset from the model's own
        # generation config (penalties, suppressed tokens, forced end tokens):
        # a bare one stands in for it meanwhile, so rollouts come from the
        # softmax the loss models.
        holder = _base_model(self.model)
        own = getattr(holder, "generation_config", None)
        was_training = self.model.training
        self.model.eval()
        try:
            if own is not None:
                holder.generation_config = GenerationConfig()
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=config,
                )
        finally:
            if own is not None:
                holder.generation_config = own
            self.model.train(was_training)
        completions = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            if end is None:
                text = tok.decode(row, skip_special_tokens=False)
                completions.append(Completion(text, truncated=True, token_ids=tuple(row)))
                continue
            text = tok.decode(row[:end], skip_special_tokens=False)
            stop = tok.decode([row[end]], skip_special_tokens=False)
            completions.append(
                Completion(
                    text,
                    stop=None if stop == tok.eos_token else stop,
                    token_ids=tuple(row[: end + 1]),
                )
            )
        return completions


class _GenerationThread:
    """One daemon thread that runs what is submitted to it, in order. A daemon,
    so that Ctrl-C or the end of the program does not wait for a generate in
    progress (minutes while transformers compiles)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="turnrl-generate", daemon=True)
        self.thread.start()

    def submit(self, work: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """``work(*args)`` on the thread; its result (or exception) in the future."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((future, work, args))
        return future

    def _serve(self) -> None:
        _on_generation_thread.yes = True
        while True:
            future, work, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work(*args))
            except BaseException as e:  # whatever it is, the caller waiting gets it
                future.set_exception(e)
            del future, work, args  # nothing of a finished call kept alive


_generation_pool: _GenerationThread | None = None
_generation_pool_lock = threading.Lock()
_on_generation_thread = threading.local()


def _generation_thread() -> _GenerationThread:
    """The process's one thread for static-cache generation (made on first use)."""
    global _generation_pool
    with _generation_pool_lock:
        if _generation_pool is None:
            _generation_pool = _GenerationThread()
        return _generation_pool


def _forget_generation_thread() -> None:
    # A forked child has none of its parent's threads: the worker is gone,
    # and work queued for it would wait for ever. The child makes its own.
    global _generation_pool, _generation_pool_lock
    _generation_pool = None
    _generation_pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_generation_thread)


def _is_static_cache(name: str | None) -> bool:
    """Whether transformers compiles the decoder for this cache (CUDA graphs on a GPU)."""
    if name is None:
        return False
    try:
        from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS
    except ImportError:
        return "static" in name
    return name in ALL_STATIC_CACHE_IMPLEMENTATIONS


def _checked_cache_implementation(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS
    except ImportError:  # a transformers that names them elsewhere checks them itself
        return name
    if name not in ALL_CACHE_IMPLEMENTATIONS:
        raise InvalidInputError(
            f"cache_implementation {name!r} is not one of transformers': "
            + ", ".join(ALL_CACHE_IMPLEMENTATIONS)
        )
    return name


class VLLMEngine:
    """vLLM's offline engine (``vllm.LLM``), with the trained LoRA adapter hot-loaded.

    ``model`` is the base model's path; ``llm_kwargs`` go to ``vllm.LLM``
    (``gpu_memory_utilization``, ``tensor_parallel_size``, ...). With
    ``enable_lora`` (the default), :meth:`load_adapter` points generation at a
    saved adapter (:func:`turnrl.train.save_adapter`'s folder) under a fresh
    LoRA id, so vLLM does not serve a stale cached copy. Special tokens are
    kept in the text, as :class:`TransformersEngine` keeps them.

    With ``logprobs`` (the default), each completion carries vLLM's
    log-probability of every sampled token, from the distribution it sampled
    (``logprobs_mode="processed_logprobs"``: after temperature), which the
    trainer's (the softmax at the same temperature) is compared with. None
    are asked for under ``top_p`` < 1, a ``top_k``, a ``min_p`` above 0 (the
    nucleus, the top k tokens, or those above the min-p floor, are
    renormalised, which the trainer's softmax is not) or a
    ``repetition_penalty`` other than 1 (which reshapes the logits), nor,
    with a vLLM too old for that mode (its log-probs are before
    temperature), at a temperature other than 1.

    With ``sleep_mode``, vLLM is made with ``enable_sleep_mode`` and
    :meth:`sleep` gives its GPU memory back while the trainer runs: the KV
    cache is dropped and the base weights wait in CPU memory (vLLM's level
    1, since a LoRA run never changes them). The next :meth:`generate`
    wakes it, as TRL's ``vllm_enable_sleep_mode`` and verl's cache freeing
    do for an engine that shares the trainer's GPU.

    Each chat is fitted to the model's context (:attr:`max_model_len`, from
    vLLM's model config, so ``max_model_len=`` in ``llm_kwargs`` sets it): a
    chat whose prompt leaves fewer than ``max_new_tokens`` tokens of room is
    sampled for at most that room (cut there, the reply is ``truncated``),
    and one that leaves no room at all is answered
    :class:`turnrl.envs.ContextLengthExceeded` alone, not generated, while
    the other chats of the batch are.

    vLLM stops on the end tokens of the model's generation config besides the
    tokenizer's (Qwen's ``<|endoftext|>`` beside ``<|im_end|>``); vLLM before
    0.12 answers a reply whose last allowed token is one of them "length".
    The engine reads them from vLLM's model config (:attr:`end_token_ids`),
    so such a reply is read as finished, on that end token, not cut.
    """

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int = 1024,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        enable_lora: bool = True,
        max_lora_rank: int = 64,
        logprobs: bool = True,
        sleep_mode: bool = False,
        **llm_kwargs: Any,
    ) -> None:
        temperature = _check_temperature(temperature)
        top_p, top_k = _check_top_p(top_p), _checked_top_k(top_k)
        min_p = _check_min_p(min_p)
        repetition_penalty = _check_repetition_penalty(repetition_penalty)
        try:
            from vllm import LLM
        except ImportError:
            raise InvalidInputError(
                "VLLMEngine needs vLLM (pip install 'turnrl[vllm]', on a machine with CUDA)"
            ) from None

        if enable_lora:
            llm_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
        if sleep_mode:
            llm_kwargs["enable_sleep_mode"] = True
        if logprobs and "logprobs_mode" not in llm_kwargs and _takes_logprobs_mode():
            llm_kwargs["logprobs_mode"] = "processed_logprobs"
        self._logprobs = logprobs
        self._processed = llm_kwargs.get("logprobs_mode") == "processed_logprobs"
        self.llm = LLM(model=model, **llm_kwargs)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        """Sampling keeps the ``top_k`` likeliest tokens only (None: all)."""
        self.min_p = min_p
        """Sampling keeps the tokens at least ``min_p`` times as likely as the
        likeliest (0: all)."""
        self.repetition_penalty = repetition_penalty
        """The penalty on the tokens already in the prompt or the reply (1: none)."""
        self.max_model_len: int | None = _llm_max_model_len(self.llm)
        """The model's context length in tokens (prompt and reply), as vLLM has it;
        None when this vLLM does not say (chats are then sent as they are)."""
        self.end_token_ids: tuple[int, ...] = _llm_end_token_ids(self.llm)
        """The end tokens vLLM stops on besides the tokenizer's eos: the model's
        generation config's (Qwen's ``<|endoftext|>`` beside ``<|im_end|>``)."""
        self._sampling_kwargs = {
            "top_p": top_p,
            # Left out when off: SamplingParams' default is off in every vLLM
            # (-1 in older ones, which refuse 0; 0 in newer ones).
            **({} if top_k is None else {"top_k": top_k}),
            # Left out when off too (SamplingParams' defaults, 0 and 1).
            **({} if min_p == 0 else {"min_p": min_p}),
            **({} if repetition_penalty == 1 else {"repetition_penalty": repetition_penalty}),
            "max_tokens": max_new_tokens,
            "skip_special_tokens": False,
            # The text then decodes as the tokenizer decodes the ids, which
            # training checks before it trains on them (as ServerEngine asks).
            "spaces_between_special_tokens": False,
        }
        self.sampling = self._sampling(temperature)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        # Shared with the engines with_temperature makes, so that they generate
        # with whichever adapter was loaded last into any of them, and wake the
        # one vLLM they share.
        self._adapter = _AdapterSlot()
        self._sleep = _SleepState(bool(llm_kwargs.get("enable_sleep_mode")))

    @property
    def asleep(self) -> bool:
        """Whether :meth:`sleep` has given vLLM's GPU memory back (until the next generate)."""
        return self._sleep.asleep

    def sleep(self) -> None:
        """Give vLLM's GPU memory back until the next :meth:`generate`: its KV
        cache is dropped (with the prefix cache) and the weights go to CPU
        memory. Needs ``sleep_mode=True``; asleep already, it does nothing."""
        state = self._sleep
        if not state.enabled:
            raise InvalidInputError("VLLMEngine.sleep needs VLLMEngine(..., sleep_mode=True)")
        with state.lock:
            if not state.asleep:
                self.llm.sleep(level=1)
                state.asleep = True

    def wake_up(self) -> None:
        """Bring the weights back and allocate the KV cache again (generate does
        this itself); awake already, it does nothing. The GPU memory this
        process's PyTorch holds cached (what the update freed) is given back
        first: vLLM maps its memory outside that cache, so memory the trainer
        took over while vLLM slept would otherwise stay out of its reach."""
        state = self._sleep
        with state.lock:
            if state.asleep:
                _release_cached_gpu_memory()
                self.llm.wake_up()
                state.asleep = False

    @property
    def lora(self) -> Any:
        """The ``LoRARequest`` of the adapter generation uses (None: the base model)."""
        return self._adapter.request

    def load_adapter(self, path: str) -> None:
        """Generate with the adapter saved at ``path`` from now on."""
        from vllm.lora.request import LoRARequest

        slot = self._adapter
        slot.last_id += 1
        slot.request = LoRARequest(f"turnrl-{slot.last_id}", slot.last_id, str(path))

    def with_temperature(self, temperature: float) -> VLLMEngine:
        """The same ``vllm.LLM`` and adapter, sampling at ``temperature`` (0: greedy).

        Loading an adapter into either engine switches both."""
        temperature = _check_temperature(temperature)
        other = copy.copy(self)
        other.temperature = temperature
        other.sampling = self._sampling(temperature)
        return other

    def _sampling(self, temperature: float, max_tokens: int | None = None) -> Any:
        from vllm import SamplingParams

        kwargs = dict(self._sampling_kwargs)
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        # Under top-p, top-k or min-p the sampler draws from a renormalised
        # nucleus, which the trainer's softmax never is: every ratio would be
        # below 1 (a turn's product near 0) with no mismatch at all; under a
        # repetition penalty from logits the trainer never sees. Raw log-probs
        # (before temperature) are the sampler's only at temperature 1.
        if self._logprobs and _full_softmax(self) and (self._processed or temperature == 1):
            kwargs["logprobs"] = 0  # the sampled token's alone
        return SamplingParams(temperature=temperature, **kwargs)

    def generate(
        self, conversations: Sequence[Chat], tools: Tools = None
    ) -> list[Completion | AgentError]:
        """Complete all chats that fit the context in one ``LLM.generate`` call
        (waking vLLM first if it sleeps); a chat with no room left is answered
        :class:`~turnrl.envs.ContextLengthExceeded`.

        Each chat is rendered here, with vLLM's tokenizer and the same messages
        training renders (:func:`turnrl.train.template_messages`), and given to
        vLLM as token ids: ``LLM.chat`` would render it again, through its own
        message parsing, which need not give the prompt training sees."""
        if not conversations:
            return []
        tokenizer = self.llm.get_tokenizer()
        prompts = [
            _prompt_ids(tokenizer, [dict(m) for m in c], tools, self.chat_template_kwargs)
            for c in conversations
        ]
        answers: list[Completion | AgentError | None] = [None] * len(prompts)
        asked = list(range(len(prompts)))
        sampling: Any = self.sampling
        limit = self.max_model_len
        if limit is not None:
            # In process, vLLM refuses a prompt of max_model_len tokens or more,
            # and the refusal fails the whole LLM.generate call: LLM._add_request
            # checks the prompt against the context with no output reserved
            # (vllm/entrypoints/llm.py _get_cmpl_tok_params, then
            # vllm/renderers/params.py), and the engine refuses a prompt as long
            # as the context (vllm/v1/engine/input_processor.py
            # _validate_prompt_len). A shorter prompt with more max_tokens than
            # room is not refused: the scheduler stops it when the context is
            # full (finish_reason "length", vllm/v1/core/sched/utils.py
            # check_stop). So a chat with no room is left out, answered alone,
            # and one with less room than max_new_tokens asks for that room,
            # which gives the same reply explicitly, whatever vLLM's version.
            per_room: dict[int, Any] = {}
            params = []
            asked = []
            for i, ids in enumerate(prompts):
                room = limit - len(ids)
                if room < 1:
                    answers[i] = ContextLengthExceeded.no_room(len(ids), limit)
                    continue
                asked.append(i)
                if room >= self.max_new_tokens:
                    params.append(self.sampling)
                else:
                    if room not in per_room:
                        per_room[room] = self._sampling(self.temperature, room)
                    params.append(per_room[room])
            # LLM.generate pairs a list of SamplingParams with the prompts one by one.
            if any(p is not self.sampling for p in params):
                sampling = params
        if asked:
            self.wake_up()
            outputs = self.llm.generate(
                [{"prompt_token_ids": prompts[i]} for i in asked],
                sampling,
                use_tqdm=False,
                lora_request=self.lora,
            )
            if len(outputs) != len(asked):
                raise RuntimeError(f"vLLM gave {len(outputs)} outputs for {len(asked)} prompts")
            for i, output in zip(asked, outputs, strict=True):
                answers[i] = self._completion(output.outputs[0], tokenizer)
        return _filled(answers)

    def _completion(self, output: Any, tokenizer: Any) -> Completion | AgentError:
        # Training checks that the ids decode to the text and its end token
        # before it uses them (turnrl.train.tokenize_rollout).
        ids = getattr(output, "token_ids", None)
        token_ids = tuple(int(i) for i in ids) if ids is not None else None
        return _vllm_completion(
            tokenizer,
            output.text,
            output.finish_reason,
            getattr(output, "stop_reason", None),
            token_ids,
            _sampled_logprobs(getattr(output, "logprobs", None), token_ids),
            self.end_token_ids,
        )


class ServerEngine:
    """A policy served by vLLM's OpenAI-compatible server (``vllm serve MODEL
    --enable-lora``), sampled through its completions API.

    The chat template is rendered here, with ``tokenizer`` (the trained
    model's, as :class:`TransformersEngine` renders it), and sent as token
    ids, so the server samples after exactly the prompt training will see.
    The chats of a batch go in one request, fitted to the model's context,
    since vLLM refuses a request as a whole (HTTP 400) where one prompt and
    its ``max_tokens`` exceed the server's ``--max-model-len``. The context
    is ``max_model_len`` when given, else the ``max_model_len`` the server's
    ``/v1/models`` gives for ``model`` (asked once, when first needed). A
    chat whose prompt leaves fewer than ``max_new_tokens`` tokens of room
    asks for that room only (cut there, the reply is ``truncated``): chats
    with the same budget share a request, and the requests go at the same
    time. A chat that leaves no room is not sent: it is answered
    :class:`turnrl.envs.ContextLengthExceeded`, while the other chats of the
    batch are generated. With no limit known (a server that does not give
    it, and no ``max_model_len``), all chats go in one request with
    ``max_new_tokens`` each, and a warning says so once: when the server
    refuses it for a prompt's length, each chat is sent again alone, and
    those it refuses are answered :class:`~turnrl.envs.ContextLengthExceeded`
    (so is a chat with some room, but less than ``max_new_tokens``).

    Each request sets ``top_p``, ``top_k``, ``min_p`` and
    ``repetition_penalty`` as given, their off values included (``top_k``
    None or 0 as -1, ``min_p`` 0, ``repetition_penalty`` 1), over the
    defaults vLLM otherwise takes from the model's
    ``generation_config.json``. The answer is the
    raw text with special tokens (no tool-call or reasoning parser on the
    server's side), without the end token it stopped on, parsed by
    :class:`EngineAgent` as for the other engines, and, through vLLM's
    ``return_tokens_as_token_ids``, the sampled token ids, end token
    included; at temperature 1 with every one of those off, their
    log-probs too (for
    :attr:`turnrl.train.GTPOConfig.rollout_correction`): there vLLM's
    default ``--logprobs-mode raw_logprobs`` (before temperature) and
    ``processed_logprobs`` are the sampler's (the ``*_logits`` modes give
    logits, which would be taken for log-probs: not for this engine). A
    server that gives no ids costs nothing but the ids: training encodes
    the text again.

    :meth:`load_adapter` registers a saved adapter with the server
    (``POST /v1/load_lora_adapter``; the server needs
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, ``--enable-lora`` and a
    ``--max-lora-rank`` of at least the adapter's, and must see the
    adapter's folder at the same path), samples with it from then on, and
    unloads the one before (first: one adapter slot, vLLM's default
    ``--max-loras 1``, is enough). ``model`` is the base model's name at the
    server (``--served-model-name``, by default what ``vllm serve`` was
    given). Endpoint options (``base_url``, ``api_key``, retries) as
    :class:`turnrl.envs.OpenAIAgent`'s.

    ``end_token_ids`` are the end tokens the server stops on besides the
    tokenizer's ``eos_token``: the model's generation config's
    ``eos_token_id`` (``GenerationConfig.from_pretrained(path).eos_token_id``;
    Qwen's lists ``<|endoftext|>`` beside ``<|im_end|>``), which vLLM adds to
    every request's stop tokens. vLLM before 0.12 answers a reply whose last
    allowed token is one of them ``"length"``: with them, it is read as
    finished (on that end token), not cut.
    """

    def __init__(
        self,
        model: str,
        tokenizer: Any,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        max_new_tokens: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        adapter_prefix: str = "turnrl",
        max_retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 600.0,
        max_model_len: int | None = None,
        end_token_ids: int | Sequence[int] | None = None,
    ) -> None:
        from turnrl.envs.agents import AgentError
        from turnrl.envs.users import ChatEndpoint

        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if max_model_len is not None and _context_length(max_model_len) is None:
            raise InvalidInputError(
                f"max_model_len must be a positive integer or None, got {max_model_len!r}"
            )
        temperature = _check_temperature(temperature)
        self.endpoint = ChatEndpoint(
            model,
            base_url,
            api_key,
            api_key_env=api_key_env,
            temperature=temperature,
            max_retries=max_retries,
            backoff=backoff,
            timeout=timeout,
            what="policy server",
            error=AgentError,
        )
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = _check_top_p(top_p)
        self.top_k = _checked_top_k(top_k)
        """Sampling keeps the ``top_k`` likeliest tokens only (None: all)."""
        self.min_p = _check_min_p(min_p)
        """Sampling keeps the tokens at least ``min_p`` times as likely as the
        likeliest (0: all)."""
        self.repetition_penalty = _check_repetition_penalty(repetition_penalty)
        """The penalty on the tokens already in the prompt or the reply (1: none)."""
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.adapter_prefix = adapter_prefix
        self.max_model_len = max_model_len
        """The server's context length as given (None: asked of the server)."""
        self.end_token_ids: tuple[int, ...] = _end_token_ids(end_token_ids, "end_token_ids")
        """The end tokens the server stops on besides the tokenizer's eos, as given."""
        # Shared with the engines with_temperature makes.
        self._adapter = _ServedAdapter()
        self._served_limit = _ServedLimit()

    @property
    def model(self) -> str:
        """The name requests ask for: the loaded adapter's, else the base model's."""
        return self._adapter.name or self.endpoint.model

    def with_temperature(self, temperature: float) -> ServerEngine:
        """The same server and adapter, sampling at ``temperature`` (0: greedy)."""
        temperature = _check_temperature(temperature)
        other = copy.copy(self)
        other.temperature = temperature
        return other

    def prompt(self, conversation: Chat, tools: Tools = None) -> str:
        """The text the model is given for ``conversation``."""
        return _render_prompt(self.tokenizer, conversation, tools, self.chat_template_kwargs)

    def context_limit(self) -> int | None:
        """The context length chats are fitted to: :attr:`max_model_len` when given,
        else the ``max_model_len`` of ``model``'s card at the server's
        ``/v1/models`` (asked once and kept, also by the engines
        :meth:`with_temperature` makes; asked again while the server cannot be
        reached); None when neither says."""
        if self.max_model_len is not None:
            return self.max_model_len
        slot = self._served_limit
        with slot.lock:
            if not slot.asked:
                slot.value, slot.asked = self._served_max_model_len()
                if slot.asked and slot.value is None:
                    warnings.warn(
                        f"{self.endpoint.where}: its /v1/models gives no max_model_len, so "
                        "a chat with less room than max_new_tokens left in the model's context "
                        "ends its episode instead of getting a shorter reply, and its batch "
                        "is sent again one chat a request; give ServerEngine(max_model_len=...) "
                        "(turnrl train --max-model-len)",
                        stacklevel=3,
                    )
            return slot.value

    def _served_max_model_len(self) -> tuple[int | None, bool]:
        """The ``max_model_len`` the server's model list gives for the base model
        (vLLM's model cards carry it; adapters' cards do not), and whether that
        answer is final (False while the server cannot be reached)."""
        oa = self.endpoint._openai
        try:
            page = self.endpoint.client.models.list()
            cards = list(getattr(page, "data", None) or [])
        except oa.APIStatusError as e:
            # A server without the route (or that refuses it) will not give it later.
            return None, not (e.status_code >= 500 or e.status_code in (408, 409, 429))
        except (oa.APIConnectionError, oa.APITimeoutError):
            return None, False
        except Exception:  # an answer that is not a model list
            return None, True
        limits = [
            _card_max_model_len(c) for c in cards if getattr(c, "id", None) == self.endpoint.model
        ]
        if all(limit is None for limit in limits):
            # Served under another name: a vLLM server serves one model.
            limits = [_card_max_model_len(c) for c in cards]
        known = [limit for limit in limits if limit is not None]
        return (min(known) if known else None), True

    def generate(
        self, conversations: Sequence[Chat], tools: Tools = None
    ) -> list[Completion | AgentError]:
        """Complete the chats, each asking for as many tokens as the context has
        room for (up to ``max_new_tokens``): one request per budget, sent at
        once; a chat with no room is answered
        :class:`~turnrl.envs.ContextLengthExceeded`. Waits for a
        :meth:`load_adapter` in progress, and samples with one adapter throughout."""
        if not conversations:
            return []
        with self._adapter.sampling():
            return self._generate(conversations, tools)

    def _generate(
        self, conversations: Sequence[Chat], tools: Tools
    ) -> list[Completion | AgentError]:
        prompts = [
            _prompt_ids(self.tokenizer, c, tools, self.chat_template_kwargs) for c in conversations
        ]
        # vLLM's server refuses a whole /v1/completions request (HTTP 400)
        # where one prompt plus max_tokens exceeds --max-model-len:
        # CompletionRequest.build_tok_params reserves max_tokens of the context
        # (vllm/entrypoints/openai/completion/protocol.py) and
        # TokenizeParams._token_len_check refuses a longer prompt
        # (vllm/renderers/params.py); older servers checked prompt +
        # max_tokens > max_model_len in vllm/entrypoints/openai/serving_engine.py.
        # It never shortens a max_tokens that was sent: get_max_tokens's
        # clamp to the room left (vllm/entrypoints/serve/utils/api_utils.py)
        # runs after that check and only counts where none was sent. So each
        # chat asks for the room it has, and one with none is not sent.
        limit = self.context_limit()
        answers: list[Completion | AgentError | None] = [None] * len(prompts)
        by_budget: dict[int, list[int]] = {}
        for i, ids in enumerate(prompts):
            budget = (
                self.max_new_tokens if limit is None else min(self.max_new_tokens, limit - len(ids))
            )
            if limit is not None and budget < 1:
                answers[i] = ContextLengthExceeded.no_room(len(ids), limit)
            else:
                by_budget.setdefault(budget, []).append(i)
        groups = list(by_budget.items())
        completed = _all_at_once(
            [
                functools.partial(self._complete, [prompts[i] for i in chats], budget, limit)
                for budget, chats in groups
            ]
        )
        for (_, chats), answer in zip(groups, completed, strict=True):
            for i, completion in zip(chats, answer, strict=True):
                answers[i] = completion
        return _filled(answers)

    def _complete(
        self, prompts: list[list[int]], max_tokens: int, limit: int | None
    ) -> list[Completion | AgentError]:
        """One completions request: a completion of each prompt, ``max_tokens`` each."""
        from turnrl.envs.agents import _is_context_refusal
        from turnrl.envs.users import MalformedAnswer

        # Log-probs come with the ids (the sampled token's alone); they are the
        # sampler's only where raw and processed ones agree, and of the
        # trainer's softmax only with nothing truncated, renormalised or penalised.
        keep_logprobs = self.temperature == 1 and _full_softmax(self)
        extra = {
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "return_tokens_as_token_ids": True,
            # What a request leaves out, vLLM takes from the model's
            # generation_config.json (``--generation-config auto``, its
            # default): Qwen's top_k 20, min_p, a repetition penalty. Rollouts
            # come from the softmax the loss models, as TransformersEngine's:
            # each is sent, at its neutral value when off.
            # top_k -1 (off): older vLLM (0.8 included) refuses 0.
            "top_k": -1 if self.top_k is None else self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        client, model = self.endpoint.client, self.model

        def send() -> list[Completion | AgentError]:
            answer = client.completions.create(
                model=model,
                prompt=prompts,
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                logprobs=0,
                extra_body=extra,
            )
            choices = getattr(answer, "choices", None)
            choices = choices if isinstance(choices, list) else []
            # The client does not check what it reads: a choice may be null,
            # text, or lack its index, which orders the choices by prompt.
            at = [getattr(c, "index", None) for c in choices]
            if not all(isinstance(i, int) for i in at):
                raise MalformedAnswer(
                    f"{len(choices)} choices for {len(prompts)} prompts, not all with an index: "
                    "not a completion of each"
                )
            if sorted(at) != list(range(len(prompts))):
                raise MalformedAnswer(
                    f"{len(choices)} choices for {len(prompts)} prompts: not a completion of each"
                )
            in_order = sorted(zip(at, choices, strict=True), key=lambda pair: pair[0])
            return [self._completion(c, keep_logprobs) for _, c in in_order]

        try:
            return list(self.endpoint.request(send, answer="completion of each prompt"))
        except AgentError as e:
            # The server found a prompt too long that was not counted so (its
            # limit unknown here): that chat alone gets the error. Among others,
            # which one it was is not known: each goes again in a request of its
            # own (at the same time), so the others are still answered.
            if not _is_context_refusal(e.__cause__):
                raise
            if len(prompts) == 1:
                return [ContextLengthExceeded(str(e), prompt_tokens=len(prompts[0]), limit=limit)]
            alone = _all_at_once(
                [functools.partial(self._complete, [p], max_tokens, limit) for p in prompts]
            )
            return [answer for answers in alone for answer in answers]

    def _completion(self, choice: Any, keep_logprobs: bool) -> Completion | AgentError:
        text = getattr(choice, "text", None)
        token_ids, logprobs = _served_tokens(getattr(choice, "logprobs", None))
        return _vllm_completion(
            self.tokenizer,
            text if isinstance(text, str) else "",
            getattr(choice, "finish_reason", None),
            # vLLM's extension: the stop token's id when one other than the
            # end-of-sequence token ended the generation.
            getattr(choice, "stop_reason", None),
            token_ids,
            logprobs if keep_logprobs else None,
            self.end_token_ids,
        )

    def load_adapter(self, path: str, *, name: str | None = None, register: bool = True) -> str:
        """Sample with the adapter saved at ``path`` from now on, under ``name``
        (by default the next ``adapter_prefix-N``), and return that name.

        With ``register=False`` nothing is sent: the adapter is one another
        process registered under ``name`` (under torchrun, rank 0 registers
        it and the other ranks only switch to it). A load waits for the
        :meth:`generate` calls in progress (the adapter before is unloaded
        only once no request asks for it), and new ones wait for the load;
        loads from several threads take turns."""
        with self._adapter.changing():
            return self._load_adapter(path, name, register)

    def _load_adapter(self, path: str, name: str | None, register: bool) -> str:
        from turnrl.envs.agents import AgentError

        slot = self._adapter
        slot.count += 1
        name = name or f"{self.adapter_prefix}-{slot.count}"
        previous = slot.name
        if register and previous is not None and previous != name:
            # The old one goes first: vLLM keeps --max-cpu-loras adapters
            # (--max-loras, 1 by default) and drops the oldest to load
            # another, after which unloading it fails (HTTP 500). Nothing
            # samples between the two calls.
            try:
                self._post("unload_lora_adapter", {"lora_name": previous})
            except AgentError as e:
                # Left loaded, it only takes one of the server's adapter slots.
                warnings.warn(f"could not unload adapter {previous!r}: {e}", stacklevel=2)
        if register:
            self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        slot.name = name
        return name

    def _post(self, route: str, body: dict[str, Any]) -> None:
        """POST ``body`` to the server's ``/v1/<route>``, once (a load that timed
        out may have happened); :class:`AgentError` on failure."""
        from turnrl.envs.agents import AgentError

        oa = self.endpoint._openai
        client = self.endpoint.client
        where = f"policy server at {client.base_url}{route}"
        try:
            client.post(f"/{route}", body=body, cast_to=str)
        except oa.APIStatusError as e:
            hint = ""
            said = e.body
            # FastAPI's 404 for a route it lacks has no vLLM error message
            # (vLLM's own 404s: an adapter not loaded, a folder not found).
            if e.status_code == 404 and not (isinstance(said, Mapping) and "message" in said):
                hint = (
                    " (start the server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and "
                    "--enable-lora)"
                )
            raise AgentError(f"{where} answered HTTP {e.status_code}: {e.message}{hint}") from e
        except oa.APIError as e:
            raise AgentError(f"{where}: {type(e).__name__}: {e}") from e


def _checked_top_k(top_k: int | None) -> int | None:
    """``top_k`` as the engines keep it: a positive int, or None for off (0, as
    TRL's and transformers' ``top_k``, is off too)."""
    return None if top_k is None else _check_top_k(top_k) or None


def _full_softmax(engine: Any) -> bool:
    """Whether an engine's sampler, with its ``top_p``, ``top_k``, ``min_p`` and
    ``repetition_penalty``, draws from the whole softmax of the model's logits
    (the trainer's), so that its log-probs are comparable with the trainer's."""
    return (
        engine.top_p == 1
        and engine.top_k is None
        and engine.min_p == 0
        and engine.repetition_penalty == 1
    )


class _ServedLimit:
    """The context length a :class:`ServerEngine` (and its copies) learned from its server."""

    __slots__ = ("asked", "lock", "value")

    def __init__(self) -> None:
        self.value: int | None = None
        self.asked = False  # True once the server's answer is final
        self.lock = threading.Lock()


def _context_length(value: Any) -> int | None:
    """``value`` when it is a context length (a positive int), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def _card_max_model_len(card: Any) -> int | None:
    """A vLLM model card's ``max_model_len`` (an extra field to openai's Model)."""
    value = getattr(card, "max_model_len", None)
    if value is None:
        value = (getattr(card, "model_extra", None) or {}).get("max_model_len")
    return _context_length(value)


def _all_at_once(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Each call's result, in order, the calls run at the same time: all but the
    first on daemon threads (a request in flight holds up neither Ctrl-C nor the
    end of the program), the first on this one. The first call's exception is
    raised at once; another's once all have ended."""
    if len(calls) <= 1:
        return [call() for call in calls]
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def run(at: int) -> None:
        try:
            results[at] = calls[at]()
        except BaseException as e:  # raised on the caller's thread
            errors[at] = e

    threads = [
        threading.Thread(target=run, args=(at,), name="turnrl-request", daemon=True)
        for at in range(1, len(calls))
    ]
    for thread in threads:
        thread.start()
    results[0] = calls[0]()  # what it raises, an interrupt too, is raised at once
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results


class _ServedAdapter:
    """The adapter a :class:`ServerEngine` (and its copies) asks for, and who is
    using it: any number of generate calls, or one load at a time."""

    __slots__ = ("count", "loading", "name", "sampling_calls", "turn")

    def __init__(self) -> None:
        self.name: str | None = None
        self.count = 0
        self.sampling_calls = 0
        self.loading = False
        self.turn = threading.Condition()

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Held while requests ask for :attr:`name`: a load waits for it."""
        with self.turn:
            self.turn.wait_for(lambda: not self.loading)
            self.sampling_calls += 1
        try:
            yield
        finally:
            with self.turn:
                self.sampling_calls -= 1
                self.turn.notify_all()

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Held while the adapter changes, once no request asks for the old one."""
        with self.turn:
            self.turn.wait_for(lambda: not self.loading)
            self.loading = True  # new generate calls wait from here on
            try:
                self.turn.wait_for(lambda: self.sampling_calls == 0)
            except BaseException:
                self.loading = False
                self.turn.notify_all()
                raise
        try:
            yield
        finally:
            with self.turn:
                self.loading = False
                self.turn.notify_all()


def _served_tokens(logprobs: Any) -> tuple[tuple[int, ...] | None, tuple[float, ...] | None]:
    """Token ids (from vLLM's ``token_id:N`` tokens) and their log-probs, each
    None when the answer does not give all of them."""
    tokens = getattr(logprobs, "tokens", None)
    if not isinstance(tokens, list):
        return None, None
    ids = []
    for token in tokens:
        text = token if isinstance(token, str) else ""
        number = text.removeprefix("token_id:")
        if number == text or not number.isdigit():
            return None, None
        ids.append(int(number))
    values = getattr(logprobs, "token_logprobs", None)
    if (
        not isinstance(values, list)
        or len(values) != len(ids)
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
    ):
        return tuple(ids), None
    return tuple(ids), tuple(float(v) for v in values)


def _vllm_completion(
    tokenizer: Any,
    text: str,
    finish_reason: Any,
    stop_reason: Any,
    token_ids: tuple[int, ...] | None,
    logprobs: tuple[float, ...] | None,
    end_ids: Collection[int] = (),
) -> Completion | AgentError:
    """A vLLM output (in process or served) as a :class:`Completion`, or, for a
    reply vLLM did not finish (``finish_reason`` "abort", "error", ...), the
    :class:`~turnrl.envs.AgentError` that ends that chat's episode alone.

    ``stop_reason`` is None for the end-of-sequence token, else the stop
    token's id (or a stop string, which is not generated text). ``end_ids``
    are the end tokens vLLM stops on besides the tokenizer's ``eos_token``
    (the model's generation config's ``eos_token_id``)."""
    if finish_reason not in ("stop", "length"):
        return AgentError(
            f"vLLM did not finish the reply (finish_reason {finish_reason!r}) after "
            f"{len(token_ids) if token_ids is not None else '?'} tokens"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if finish_reason == "length":
        last = token_ids[-1] if token_ids else None
        if last is None or not (last == eos or last in end_ids):
            return Completion(text, truncated=True, token_ids=token_ids, logprobs=logprobs)
        # vLLM before 0.12 checks the length limit before the end tokens, the
        # generation config's as the tokenizer's (check_stop in
        # vllm/v1/core/sched/utils.py), so a reply whose last allowed token
        # ends it comes back "length", with the end token's text still in it
        # (only a stop is left out of the text): it is finished, not cut.
        if last == eos:
            end_text, stop = getattr(tokenizer, "eos_token", None), None
        else:
            end_text = tokenizer.decode([last], skip_special_tokens=False)
            stop = end_text
        if isinstance(end_text, str) and end_text and text.endswith(end_text):
            text = text[: -len(end_text)]
        return Completion(text, stop=stop, token_ids=token_ids, logprobs=logprobs)
    stop = None
    if isinstance(stop_reason, int) and not isinstance(stop_reason, bool):
        stop = tokenizer.decode([stop_reason], skip_special_tokens=False)
    return Completion(text, stop=stop, token_ids=token_ids, logprobs=logprobs)


def _filled(answers: Sequence[Any]) -> list[Any]:
    """``answers`` as a list, every one given (an answer per chat, in order)."""
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        raise RuntimeError(f"no answer for chats {missing}")
    return list(answers)


def _llm_model_config(llm: Any) -> Any:
    """A ``vllm.LLM``'s model config (vLLM's ``ModelConfig``), or None where this
    vLLM keeps it elsewhere."""
    config = getattr(llm, "model_config", None)  # newer vLLM keeps it on the LLM
    engine = getattr(llm, "llm_engine", None)
    if config is None:
        config = getattr(engine, "model_config", None)
    getter = getattr(engine, "get_model_config", None)
    if config is None and callable(getter):
        config = getter()  # older vLLM
    return config


def _llm_max_model_len(llm: Any) -> int | None:
    """The context length of a ``vllm.LLM`` (its model config's ``max_model_len``),
    or None where this vLLM keeps it elsewhere."""
    return _context_length(getattr(_llm_model_config(llm), "max_model_len", None))


def _end_token_ids(value: Any, where: str) -> tuple[int, ...]:
    """A generation config's ``eos_token_id`` (None, one id or a list of them)
    as a tuple of ids; anything else is refused, naming ``where`` it came from."""
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) else value
    if (
        isinstance(ids, (str, bytes, Mapping))
        or not isinstance(ids, Collection)
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    ):
        raise InvalidInputError(
            f"{where}: end token ids must be a token id or a list of them, not {value!r}"
        )
    return tuple(sorted({int(i) for i in ids}))


def _llm_end_token_ids(llm: Any) -> tuple[int, ...]:
    """The end tokens a ``vllm.LLM`` stops on besides its tokenizer's eos: the
    ``eos_token_id`` of the generation config its model config reads
    (``ModelConfig.try_get_generation_config``: what vLLM's input processor
    adds to every request's stop tokens, whichever ``generation_config``
    source gives the sampling defaults); none where this vLLM does not say."""
    getter = getattr(_llm_model_config(llm), "try_get_generation_config", None)
    if not callable(getter):
        return ()
    fields = getter()
    if not isinstance(fields, Mapping):
        return ()
    return _end_token_ids(fields.get("eos_token_id"), "vLLM's generation config")


def _prompt_ids(
    tokenizer: Any, conversation: Chat, tools: Tools, chat_template_kwargs: Mapping[str, Any]
) -> list[int]:
    """The token ids of the prompt of ``conversation``, as every engine here
    samples after it: the chat template's text, encoded without special
    tokens added (the template writes its own), as vLLM's ``LLM.chat`` does."""
    # vLLM's mistral_common tokenizer encodes text as plain text, control
    # tokens ([INST], [AVAILABLE_TOOLS]) included, so it must render to ids
    # itself, as vLLM's own renderer asks it to (vllm/renderers/mistral.py).
    # Before vLLM 0.13 it rendered to ids whatever it was asked.
    to_ids = type(tokenizer).__name__ == "MistralTokenizer"
    rendered = _apply_template(tokenizer, conversation, tools, chat_template_kwargs, to_ids)
    if isinstance(rendered, str):
        return [int(i) for i in tokenizer.encode(rendered, add_special_tokens=False)]
    return [int(i) for i in rendered]


def _render_prompt(
    tokenizer: Any, conversation: Chat, tools: Tools, chat_template_kwargs: Mapping[str, Any]
) -> str:
    return str(_apply_template(tokenizer, conversation, tools, chat_template_kwargs))


def _apply_template(
    tokenizer: Any,
    conversation: Chat,
    tools: Tools,
    chat_template_kwargs: Mapping[str, Any],
    tokenize: bool = False,
) -> Any:
    """The chat template's rendering of ``conversation`` up to the generation
    prompt: its text, or with ``tokenize`` its token ids."""
    return tokenizer.apply_chat_template(
        template_messages(conversation),
        tools=list(tools) if tools else None,
        add_generation_prompt=True,
        tokenize=tokenize,
        **chat_template_kwargs,
    )


def _release_cached_gpu_memory() -> None:
    """Free this process's unused cached CUDA blocks (torch.cuda.empty_cache),
    when CUDA is in use here."""
    import gc

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()  # tensors only a reference cycle still holds
        torch.cuda.empty_cache()


def _takes_logprobs_mode() -> bool:
    """Whether this vLLM's ``logprobs_mode="processed_logprobs"`` gives the
    log-probs it sampled from (0.10.2 and later): 0.10.0 and 0.10.1 have the
    option, but take them before temperature."""
    try:
        import vllm
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return False
    has_mode = dataclasses.is_dataclass(EngineArgs) and any(
        field.name == "logprobs_mode" for field in dataclasses.fields(EngineArgs)
    )
    return has_mode and _release(getattr(vllm, "__version__", None)) >= (0, 10, 2)


def _release(version: Any) -> tuple[int, ...]:
    """The release numbers of a version string ("0.10.2rc1" -> (0, 10, 2));
    () when it has none."""
    numbers = re.match(r"\d+(?:\.\d+)*", version) if isinstance(version, str) else None
    return tuple(int(n) for n in numbers.group().split(".")) if numbers else ()


def _sampled_logprobs(entries: Any, token_ids: tuple[int, ...] | None) -> tuple[float, ...] | None:
    """vLLM's log-probability of each sampled token (its per-position dicts of
    id -> ``Logprob``), or None when any is missing or not finite."""
    if entries is None or token_ids is None:
        return None
    try:
        if len(entries) != len(token_ids):
            return None
        values = []
        for entry, token in zip(entries, token_ids, strict=True):
            found = entry.get(token) if isinstance(entry, Mapping) else None
            value = float(getattr(found, "logprob", found))
            if not math.isfinite(value):
                return None
            values.append(value)
    except (TypeError, ValueError):
        return None
    return tuple(values)


def _as_id(value: Any) -> Any:
    """An int for anything integral (numpy, 0-d tensors); other values unchanged."""
    try:
        return operator.index(value)
    except TypeError:
        return value


class _AdapterSlot:
    """The LoRA adapter a :class:`VLLMEngine` (and its copies) generates with."""

    __slots__ = ("last_id", "request")

    def __init__(self) -> None:
        self.request: Any = None
        self.last_id = 0


class _SleepState:
    """Whether the ``vllm.LLM`` a :class:`VLLMEngine` and its copies share is asleep."""

    __slots__ = ("asleep", "enabled", "lock")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.asleep = False
        self.lock = threading.Lock()


class _Request:
    __slots__ = ("conversation", "done", "error", "result", "tools")

    def __init__(self, conversation: Chat, tools: Tools) -> None:
        self.conversation = conversation
        self.tools = tools
        self.done = False
        self.result: Completion | None = None
        self.error: BaseException | None = None


class EngineAgent:
    """A ``run_episode`` agent on an :class:`Engine`, batching concurrent episodes.

    Each call renders nothing itself: the engine gets the chat and the tool schemas, and the
    completion is parsed with :func:`turnrl.envs.agents.reply_from_text` (``fmt`` as
    :func:`turnrl.parse_tool_calls`); the raw completion is kept in the reply for training, with
    ``truncated`` when the generation hit the token limit and ``completion_ids`` when the engine
    gave its ids. Calls from several threads are gathered: while one ``generate`` runs, the
    requests that arrive wait, and the first of them to wake takes them all (at most
    ``max_batch``) into the next one; a request that is answered returns at once. An engine
    error is raised in every episode whose request was in that batch; an exception the
    engine gives in one chat's place (see :class:`Engine`) is raised in that episode alone,
    :class:`turnrl.envs.ContextLengthExceeded` for a chat the model's context has no room
    to answer, which :func:`turnrl.envs.run_episode` takes for the episode's end.

    Before a batch starts, its leader waits for requests still on their way: until none
    has come for ``gather_window`` seconds, the batch is full, or ten windows have passed.
    Without this the episodes split into cohorts that take turns at the engine (the first
    request of a step runs alone while the others queue behind it, and so on every turn),
    and decoding, which costs about as much for one chat as for many on a GPU, runs twice
    as often as it needs to. 0 starts every batch at once.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        fmt: str = "auto",
        max_batch: int = 64,
        gather_window: float = 0.01,
    ) -> None:
        if max_batch < 1:
            raise InvalidInputError(f"max_batch must be at least 1, got {max_batch}")
        if not 0 <= gather_window < math.inf:
            raise InvalidInputError(
                f"gather_window must be finite and >= 0 seconds, got {gather_window}"
            )
        self.engine = engine
        self.fmt = fmt
        self.max_batch = max_batch
        self.gather_window = gather_window
        self._pending: list[_Request] = []
        self._changed = threading.Condition()
        self._busy = False
        self.batches: list[int] = []
        """The size of every ``generate`` call made, in order."""

    def __call__(self, messages: Chat, tools: Tools) -> dict[str, Any]:
        """The assistant's next message, parsed from the engine's completion."""
        request = _Request([dict(m) for m in messages], tools)
        with self._changed:
            self._pending.append(request)
            self._changed.notify_all()  # a leader gathering a batch counts arrivals
        while True:
            with self._changed:
                while self._busy and not request.done:
                    self._changed.wait()
                if request.done:
                    break
                # This thread leads the next batch: everything waiting, in order.
                batch: list[_Request] = []
                try:
                    self._busy = True
                    self._gather()
                    batch = self._pending[: self.max_batch]
                    del self._pending[: self.max_batch]
                    self._changed.release()
                    try:
                        self._run(batch)
                    finally:
                        self._changed.acquire()
                except BaseException:
                    # An interrupt: this episode is over, its request must not
                    # linger for a later batch to generate.
                    # It may have come just after the release: hold the lock again.
                    if not self._changed._is_owned():  # type: ignore[attr-defined]
                        self._changed.acquire()
                    if request in self._pending:
                        self._pending.remove(request)
                    # The other requests it took but did not start go back to the
                    # front of the queue; nobody would answer them otherwise.
                    self._pending[:0] = [
                        r
                        for r in batch
                        if r is not request and not r.done and r not in self._pending
                    ]
                    raise
                finally:
                    self._busy = False
                    self._changed.notify_all()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        reply = reply_from_text(request.result.text, tools, fmt=self.fmt)
        if request.result.truncated:
            reply["truncated"] = True
        if request.result.stop is not None:
            reply["completion_end"] = request.result.stop
        if request.result.token_ids is not None:
            # As given (numpy or tensor ids included); training checks them.
            reply["completion_ids"] = [_as_id(i) for i in request.result.token_ids]
            if request.result.logprobs is not None:
                reply["completion_logprobs"] = list(request.result.logprobs)
        return reply

    def _gather(self) -> None:
        """Wait, holding the lead, for the requests of episodes that are about to ask."""
        window = self.gather_window
        if window <= 0:
            return
        deadline = time.monotonic() + 10 * window
        arrived = len(self._pending)
        while arrived < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._changed.wait(min(window, left))
            if len(self._pending) == arrived:
                return  # a quiet window: nobody else is on the way
            arrived = len(self._pending)

    def _run(self, batch: list[_Request]) -> None:
        try:
            by_tools: dict[str, list[_Request]] = {}
            for request in batch:
                key = json.dumps(list(request.tools or []), sort_keys=True, default=str)
                by_tools.setdefault(key, []).append(request)
            for requests in by_tools.values():
                outputs = list(
                    self.engine.generate([r.conversation for r in requests], requests[0].tools)
                )
                if len(outputs) != len(requests):
                    raise RuntimeError(
                        f"the engine returned {len(outputs)} completions for {len(requests)} chats"
                    )
                self.batches.append(len(requests))
                for request, output in zip(requests, outputs, strict=True):
                    if isinstance(output, Exception):
                        request.error = output  # this chat's answer alone
                    elif isinstance(output, Completion):
                        request.result = output
                    else:
                        request.result = Completion(str(output))
                    request.done = True
        except BaseException as e:  # every episode still waiting in the batch hears of it
            for request in batch:
                if not request.done:
                    request.error = e
            if not isinstance(e, Exception):
                raise  # an interrupt still stops the leading thread
        finally:
            # Nobody may wait for ever on a request that was taken off the queue.
            for request in batch:
                request.done = True
