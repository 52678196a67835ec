"""Serving pieces without a server: settings, request validation, response bodies, model loading.

    python -m pytest -q tests/unit/test_serve_protocol.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from switchyard.serve import protocol as P
from switchyard.serve.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]


def test_config_defaults_yaml_and_overrides(tmp_path):
    config = ServeConfig.load(REPO / "configs" / "serve" / "tiny.yaml", {"port": 9001, "host": None})
    assert (config.model, config.ep, config.port, config.host) == ("tiny", 2, 9001, "127.0.0.1")
    defaults = ServeConfig.load(REPO / "configs" / "serve" / "default.yaml")
    assert defaults == ServeConfig()  # the commented reference file lists the real defaults
    for bad in ({"ep": 0}, {"port": 70000}, {"dtype": "int8"}, {"api_key": " "}, {"max_batch": True},
                {"heartbeat_s": 0}, {"log_level": "warn"}):
        with pytest.raises(ValueError):
            ServeConfig(**bad)
    (tmp_path / "x.yaml").write_text("mdoel: tiny\n")
    with pytest.raises(ValueError, match="unknown serve settings"):
        ServeConfig.load(tmp_path / "x.yaml")
    # YAML reads these as numbers or lists: each is named, none crashes later (api_key's .strip() did)
    for text, message in (("api_key: 12345", r"api_key must be a string or null, got 12345 \(int\)"),
                          ("model: 7", "model must be a string, got 7"), ("host: [a]", "host must be a string"),
                          ("heartbeat_s: fast", "heartbeat_s must be a number, got 'fast'")):
        (tmp_path / "y.yaml").write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            ServeConfig.load(tmp_path / "y.yaml")
    assert ServeConfig(heartbeat_s=5).heartbeat_s == 5  # an int where seconds are a float is fine
    assert ServeConfig(log_level="DEBUG").log_level == "DEBUG"  # uvicorn lowercases it
    with pytest.raises(ValueError, match=r"log_level='warn' is not one of \('critical', 'error', 'warning'"):
        ServeConfig(log_level="warn")  # was uvicorn's KeyError on rank 0 after the model had loaded



def test_the_api_key_from_the_environment_and_the_model_id_of_a_relative_path(tmp_path, monkeypatch):
    """A key passed as --api-key is in the deepspeed launcher's log (three times) and in ``ps``: the environment
    variable keeps it out of both. ``--model .`` served the id "" (``Path(".").name``)."""
    monkeypatch.setenv("SWITCHYARD_API_KEY", "env-key")
    assert ServeConfig.load(None, {"model": "m"}).api_key == "env-key"
    assert ServeConfig.load(None, {"model": "m", "api_key": "flag-key"}).api_key == "flag-key"  # the flag wins
    (tmp_path / "key.yaml").write_text("api_key: file-key\n")
    assert ServeConfig.load(tmp_path / "key.yaml").api_key == "file-key"  # and the file
    monkeypatch.setenv("SWITCHYARD_API_KEY", "")
    with pytest.raises(ValueError, match="api_key must not be empty; leave it out \\(and SWITCHYARD_API_KEY unset\\)"):
        ServeConfig.load(None, {"model": "m"})
    monkeypatch.delenv("SWITCHYARD_API_KEY")
    assert ServeConfig.load(None, {"model": "m"}).api_key is None
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    assert ServeConfig(model=".").model_id(Path(".")) == "my-model"
    assert ServeConfig(model=".", served_model_name="org/m").model_id(Path(".")) == "org/m"
    # a fine-tune checkpoint: every one is .../checkpoints/step_N/model, so the run and the step name it
    step = tmp_path / "runs" / "qwen3_moe" / "checkpoints" / "step_000400" / "model"
    assert ServeConfig(model=str(step)).model_id(step) == "qwen3_moe-step_000400"
    assert ServeConfig(model=str(step), served_model_name="m").model_id(step) == "m"
    assert ServeConfig(model="x").model_id(tmp_path / "other" / "model") == "model"  # not a fine-tune's layout
    with pytest.raises(ValueError, match="served_model_name must not be empty"):
        ServeConfig(model=".", served_model_name=" ")

def test_requests_validate_types_and_ranges():
    ok = P.CompletionRequest(model="m", prompt="hi", stop="\n")
    assert ok.stop == ["\n"] and ok.max_tokens is None and ok.temperature == 1.0
    assert P.CompletionRequest(model="m", prompt=[[1, 2], [3]]).prompt == [[1, 2], [3]]
    chat = P.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                     {"type": "text", "text": "b"}]}],
                                   max_completion_tokens=5, unknown_field=1)
    assert chat.messages[0].text() == "ab" and chat.max_new_tokens == 5
    bad = [dict(prompt="x", max_tokens=0), dict(prompt="x", temperature=-0.1), dict(prompt="x", top_p=0),
           dict(prompt="x", n=0), dict(prompt="x", stop=["a"] * 5), dict(prompt="x", stop=[""]), dict(prompt=3),
           dict(prompt=[]), dict(prompt="x", echo=True, logprobs=0), dict(prompt="x", logprobs=21), dict(prompt="x", logprobs=-1),
           dict(prompt="x", max_tokens="a"),
           dict(prompt="x", presence_penalty=2.5), dict(prompt="x", frequency_penalty=-2.1),
           dict(prompt="x", stream_options={"include_usage": True})]
    for fields in bad:
        with pytest.raises(ValidationError):
            P.CompletionRequest(model="m", **fields)
    assert P.CompletionRequest(model="m", prompt="x", stream=True, stream_options={"include_usage": True}).stream
    for messages in ([], "hi", [{"role": "robot", "content": "x"}]):
        with pytest.raises(ValidationError):
            P.ChatCompletionRequest(model="m", messages=messages)
    with pytest.raises(ValidationError):
        P.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}])


def test_null_means_the_default_but_required_fields_stay_required():
    """OpenAI and vLLM take ``"temperature": null`` (clients send it) as the default; it was a 400."""
    defaults = dict(temperature=1.0, top_p=1.0, n=1, stream=False, presence_penalty=0.0, frequency_penalty=0.0,
                    ignore_eos=False, return_token_ids=False)
    for field, default in {**defaults, "echo": False}.items():
        assert getattr(P.CompletionRequest(model="m", prompt="x", **{field: None}), field) == default, field
    messages = [{"role": "user", "content": "x", "name": None}]
    for field, default in {**defaults, "logprobs": False}.items():
        assert getattr(P.ChatCompletionRequest(model="m", messages=messages, **{field: None}), field) == default, field
    streamed = P.CompletionRequest(model="m", prompt="x", stream=True, stream_options={"include_usage": None})
    assert streamed.stream_options == P.StreamOptions(include_usage=False)
    assert P.CompletionRequest(model="m", prompt="x", max_tokens=None, seed=None, stop=None).max_tokens is None
    for missing in (dict(model=None, prompt="x"), dict(model="m", prompt=None)):
        with pytest.raises(ValidationError):
            P.CompletionRequest(**missing)
    with pytest.raises(ValidationError):
        P.ChatCompletionRequest(model="m", messages=None)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from switchyard.serve.loading import build_tiny_moe

    base = tmp_path_factory.getbasetemp()
    return AutoTokenizer.from_pretrained(build_tiny_moe(base / "serve-tiny-moe", base / "serve-cache"))


def test_chat_logprob_bytes_are_the_tokens_raw_bytes(tiny_tok):
    """A byte-level token inside a character reads U+FFFD, but its ``bytes`` are its own raw bytes (not U+FFFD's
    UTF-8): concatenated they rebuild the text, as OpenAI defines them."""
    from switchyard.serve.app import _Logprobs

    text = "ͧ é ✓ ok"
    ids = tiny_tok(text).input_ids
    assert any(tiny_tok.decode([t]) == "\ufffd" for t in ids)  # some tokens split a character
    eos = tiny_tok.eos_token_id
    steps = [(t, (-0.5, ((t, -0.5), (ids[0], -1.0), (eos, -2.0)))) for t in ids]
    content = _Logprobs(tiny_tok).chat(steps).content
    assert b"".join(bytes(e.bytes) for e in content) == text.encode()
    assert [e.top_logprobs[0].bytes for e in content] == [e.bytes for e in content]
    assert all(bytes(e.top_logprobs[1].bytes) == "ͧ".encode()[:1] for e in content)
    assert all(bytes(e.top_logprobs[2].bytes) == tiny_tok.eos_token.encode() for e in content)  # a special token


def test_chat_logprob_bytes_of_sentencepiece_byte_fallback_tokens():
    from switchyard.serve.app import _Logprobs

    class Tok:  # a SentencePiece tokenizer with byte fallback: "ͧ" is <0xCD><0xA7>
        pieces, texts = ["<0xCD>", "<0xA7>", "▁hi"], ["\ufffd", "\ufffd", " hi"]

        def convert_ids_to_tokens(self, token_id):
            return self.pieces[token_id]

        def decode(self, ids, **kwargs):
            return self.texts[ids[0]]

    content = _Logprobs(Tok()).chat([(t, (-1.0, ())) for t in (2, 0, 1)]).content
    assert [e.bytes for e in content] == [list(b" hi"), [0xCD], [0xA7]]


def test_unicode_the_tokenizer_refuses_is_a_400_naming_the_param(tiny_tok):
    """JSON's "\\ud800" is a lone surrogate: valid JSON, but not text the tokenizer takes (it was a 500)."""
    from switchyard.serve.app import APIError, _tokenize

    assert _tokenize(tiny_tok, "hi", "prompt") == tiny_tok("hi").input_ids
    for param in ("prompt", "messages"):
        with pytest.raises(APIError, match="could not be tokenized") as err:
            _tokenize(tiny_tok, "hi \ud800", param)
        assert (err.value.status, err.value.param) == (400, param)


def test_bodies_keep_openai_nulls_and_drop_unrequested_extensions():
    usage = P.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    body = P.dump(P.CompletionResponse(id="c", created=0, model="m", usage=usage,
                                       choices=[P.CompletionChoice(index=0, text="a", finish_reason=None)]))
    assert body["choices"][0] == {"index": 0, "text": "a", "finish_reason": None, "logprobs": None}
    assert "prompt_token_ids" not in body and body["object"] == "text_completion"
    body = P.dump(P.CompletionResponse(id="c", created=0, model="m", prompt_token_ids=[[1]],
                                       choices=[P.CompletionChoice(index=0, text="a", finish_reason="stop",
                                                                   token_ids=[5])]))
    assert body["choices"][0]["token_ids"] == [5] and body["prompt_token_ids"] == [[1]]
    chunk = P.dump(P.ChatCompletionChunk(id="x", created=0, model="m",
                                         choices=[P.ChatChunkChoice(index=0, delta=P.DeltaMessage(content="hi"))]))
    assert chunk["choices"][0]["delta"] == {"content": "hi"} and chunk["object"] == "chat.completion.chunk"
    assert "system_fingerprint" in chunk  # as in OpenAI's chunks (null here, as in the responses)
    assert P.error_body(404, "no", "model", "model_not_found") == {
        "error": {"message": "no", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


def test_an_exported_hf_moe_dir_serves_the_same_tokens(tmp_path_factory):
    """``--model <exported dir>``: transformers loads it, patch_model adopts its blocks; same greedy tokens."""
    import switchyard as sy
    from switchyard.serve.engine import Engine, ModelRunner, Sequence
    from switchyard.serve.loading import build_tiny_moe, load_for_serving
    from switchyard.serve.sampling import SamplingParams

    base = tmp_path_factory.getbasetemp()
    ours = build_tiny_moe(base / "serve-tiny-moe", base / "serve-cache")
    model, tok = load_for_serving(ours, None)
    exported = sy.export_hf(model, base / "serve-exported", tokenizer=tok)
    adopted, tok2 = load_for_serving(Path(exported), None)
    assert sy.hf.patch.moe_layers(adopted) and adopted.config.switchyard["mode"] == "adopt"
    ids = tok("def main():").input_ids
    want = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
    engine = Engine(ModelRunner(adopted), tok2)
    seq = Sequence(ids, SamplingParams(max_tokens=12, temperature=0))
    engine.submit([seq])
    engine.run_until_idle()
    assert seq.output_ids == want
    (base / "dense-only").mkdir(exist_ok=True)
    (base / "dense-only" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="safetensors"):
        load_for_serving(base / "dense-only", None)


def test_a_model_dir_without_a_tokenizer_is_an_error_naming_it(tmp_path):
    """`switchyard upcycle` of a model saved without its tokenizer writes none; serving it was transformers'
    "Couldn't instantiate the backend tokenizer" (no path, no fix)."""
    import switchyard as sy
    from switchyard.serve.loading import load_for_serving
    from tiny_models import build

    model = sy.patch_model(build("llama"), sy.MoEConfig(num_experts=4, top_k=2))
    sy.save_pretrained(model, tmp_path / "no-tok")
    with pytest.raises(ValueError, match=r"no-tok has no tokenizer files .*save_pretrained"):
        load_for_serving(tmp_path / "no-tok", None)


def test_max_model_len_beyond_the_model_is_refused_not_silently_lowered():
    from types import SimpleNamespace

    from switchyard.serve.loading import context_length

    model_config = SimpleNamespace(max_position_embeddings=256)
    assert context_length(None, model_config) == 256
    assert context_length(100, model_config) == 100
    assert context_length(None, SimpleNamespace()) == 2048
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's max_position_embeddings=256"):
        context_length(4096, model_config)


def test_logit_bias_tools_and_content_parts_are_honoured_or_refused_never_ignored():
    """``logit_bias``, ``functions`` and ``tool_choice`` used to be dropped as unknown fields without a word;
    an image part was pydantic's ``content.str: Input should be a valid string``."""
    req = P.CompletionRequest(model="m", prompt="x", logit_bias={"7": 100, " 12": -2.5})
    assert req.logit_bias_ids == ((7, 100.0), (12, -2.5))
    assert P.CompletionRequest(model="m", prompt="x", logit_bias=None).logit_bias_ids == ()
    for bias, message in (({"x": 1}, r"token ids .*got 'x'"), ({"-3": 1}, "token ids"),
                          ({"7": 100.5}, r"bias of token 7 is 100.5; it must be in \[-100, 100\]")):
        with pytest.raises(ValidationError, match=message):
            P.CompletionRequest(model="m", prompt="x", logit_bias=bias)
    user = [{"role": "user", "content": "x"}]
    assert P.ChatCompletionRequest(model="m", messages=user, logit_bias={"3": 1}).logit_bias_ids == ((3, 1.0),)
    chat = P.ChatCompletionRequest(model="m", messages=user, tool_choice="none", function_call="auto")
    assert chat.tool_choice == "none"
    for fields, message in ((dict(functions=[{"name": "f"}]), "functions"),
                            (dict(tool_choice="required"), "tool_choice='required' needs tools"),
                            (dict(tool_choice={"type": "function", "function": {"name": "f"}}), "needs tools"),
                            (dict(function_call={"name": "f"}), "function_call=")):
        with pytest.raises(ValidationError, match=message):
            P.ChatCompletionRequest(model="m", messages=user, **fields)
    image = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}]
    with pytest.raises(ValidationError, match="content part type 'image_url' is not supported"):
        P.ChatCompletionRequest(model="m", messages=image)
    # vLLM's sampling extensions (clients send them with extra_body) and audio output: "off" passes, else a 400
    off = dict(top_k=-1, min_p=0.0, repetition_penalty=1.0, min_tokens=0, stop_token_ids=[], use_beam_search=False,
               modalities=["text"], guided_json=None)
    P.ChatCompletionRequest(model="m", messages=user, **off)
    for name, value in (("min_p", 0.1), ("repetition_penalty", 1.2), ("min_tokens", 3), ("stop_token_ids",
                        [2]), ("guided_json", {"type": "object"}), ("modalities", ["text", "audio"])):
        with pytest.raises(ValidationError, match=f"{name}=.* is not supported by this server; leave {name} out"):
            P.CompletionRequest(model="m", prompt="x", **{name: value})


def test_completion_top_logprobs_hold_the_sampled_token(tiny_tok):
    """OpenAI's legacy ``top_logprobs``: the top ``logprobs`` tokens *and* the sampled one (up to logprobs + 1);
    a sampled token outside the top was missing, and ``logprobs: 0`` gave empty dicts."""
    from switchyard.serve.app import _Logprobs

    a, b, c = tiny_tok("a b c", add_special_tokens=False).input_ids[:3]
    text = _Logprobs(tiny_tok).text
    out = _Logprobs(tiny_tok).completion([(c, (-3.0, ((a, -0.5),))), (a, (-0.5, ((a, -0.5),))), (b, (-1.0, ()))])
    assert out.top_logprobs == [{text(a): -0.5, text(c): -3.0}, {text(a): -0.5}, {text(b): -1.0}]


def test_logprobs_of_ids_past_the_tokenizer_vocabulary(tiny_tok):
    """Models pad their vocabulary past the tokenizer's (Qwen: 151936 rows, 151665 tokens); such an id in the top
    alternatives has no piece (``convert_ids_to_tokens`` is None) and crashed chat logprobs with a 500."""
    from switchyard.serve.app import _Logprobs

    padded = len(tiny_tok) + 3
    assert tiny_tok.convert_ids_to_tokens(padded) is None
    content = _Logprobs(tiny_tok).chat([(5, (-1.0, ((padded, -0.9), (5, -1.0))))]).content
    assert content[0].top_logprobs[0].token == tiny_tok.decode([padded]) and content[0].top_logprobs[0].bytes == []


def test_a_400_from_a_request_level_check_names_its_field_without_pydantics_prefix():
    """Request-level checks (model validators) carry no field location; their 400 still names the field, as
    OpenAI's errors do, and the message is the check's own (it was "Value error, …" with param null)."""
    from switchyard.serve.app import validation_error

    cases = [(P.CompletionRequest, dict(prompt="x", echo=True, logprobs=1), "echo", "echo with logprobs needs"),
             (P.CompletionRequest, dict(prompt="x", suffix="y"), "suffix", "best_of > 1 and suffix"),
             (P.CompletionRequest, dict(prompt="x", stream_options={"include_usage": True}), "stream_options",
              "stream_options is only allowed with stream=true"),
             (P.CompletionRequest, dict(prompt="x", frequency_penalty=2.5), "frequency_penalty", "less than or equal"),
             (P.CompletionRequest, dict(prompt=[]), "prompt", "prompt must not be an empty list"),
             (P.CompletionRequest, dict(prompt="x", min_p=0.5), "min_p", "min_p=0.5 is not supported by this server"),
             (P.CompletionRequest, dict(prompt="x", max_tokens=0), "max_tokens", "greater than or equal to 1"),
             (P.ChatCompletionRequest, dict(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]),
              "tools", "tools (and functions) are not supported"),
             (P.ChatCompletionRequest, dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2),
              "top_logprobs", "top_logprobs needs logprobs: true")]
    for request, fields, param, text in cases:
        with pytest.raises(ValidationError) as err:
            request(model="m", **fields)
        message, got_param, code = validation_error(err.value.errors())
        assert (got_param, code) == (param, "invalid_value"), (fields, message)
        assert text in message and "Value error" not in message, message
