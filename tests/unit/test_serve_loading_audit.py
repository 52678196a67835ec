"""What a user meets pointing ``--model`` / ``--ep`` / ``--port`` at the wrong thing, and a rank dying mid-request.

Each load mistake is one line naming the file and the fix, on every rank, before any weight is read and before
the port is bound (exit code 2). Most directories here are a config.json and a few-byte safetensors file: the
checks read headers and configs only.

    python -m pytest -q tests/unit/test_serve_loading_audit.py
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from harness import REPO_ROOT, run_on_ranks, run_script

TINY_MOE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96, num_local_experts=4, num_experts_per_tok=2)


def hf_dir(path: Path, model_type: str = "mixtral", edit: dict | None = None, **fields) -> Path:
    """A config.json (``edit`` written over it as is) and one small safetensors file: enough for every check
    before loading."""
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **{**TINY_MOE, **fields}).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **(edit or {})}))
    save_file({"x": torch.zeros(4)}, str(path / "model.safetensors"))
    return path


def add_tokenizer(path: Path) -> Path:
    """A two-word tokenizer: the checks only need one that loads."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(path)
    return path


def load_error(path: Path, groups=None) -> str:
    from switchyard.serve.loading import load_for_serving

    with pytest.raises(ValueError) as err:
        load_for_serving(path, groups)
    return str(err.value)


def test_a_broken_config_json_is_an_error_naming_the_file(tmp_path):
    """json's message named only a line and column; a value transformers rejects (a dtype torch lacks, a field of
    the wrong type) was a traceback — or, read first by the tokenizer's loader, "no tokenizer"."""
    bad = hf_dir(tmp_path / "not-json")
    (bad / "config.json").write_text('{"model_type": "mixtral", ')
    assert f"{bad / 'config.json'} is not valid JSON" in load_error(bad)
    (bad / "config.json").write_text("[1, 2]")
    assert f"{bad / 'config.json'} holds a JSON list, not an object" in load_error(bad)
    dtype = hf_dir(tmp_path / "dtype", edit={"dtype": "float99"})
    message = load_error(dtype)
    assert f"{dtype / 'config.json'} is not a config transformers can read" in message and "float99" in message
    typed = hf_dir(tmp_path / "typed", edit={"hidden_size": "abc"})
    assert "hidden_size" in load_error(typed) and str(typed / "config.json") in load_error(typed)


def test_missing_or_truncated_weights_files_are_named_before_loading(tmp_path):
    """An HF directory's missing shard or truncated file was transformers' traceback from inside its loader."""
    sharded = hf_dir(tmp_path / "sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    message = load_error(sharded)
    assert f"{sharded / 'model-00002-of-00002.safetensors'} (listed in model.safetensors.index.json) is missing" \
        in message and "fetch the model again" in message
    cut = hf_dir(tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-8])
    assert f"cannot read {cut / 'model.safetensors'}: truncated or corrupt" in load_error(cut)


def test_dense_and_unadoptable_moe_dirs_say_what_to_do(tmp_path):
    """A dense model gets the upcycle command; an MoE family switchyard cannot reproduce was told to "upcycle a
    dense model first" too — now it hears what differs."""
    dense = hf_dir(tmp_path / "dense", "llama")
    assert f"switchyard upcycle --model {dense} --num-experts 8 --top-k 2 --out {dense}-moe" in load_error(dense)
    gpt_oss = hf_dir(tmp_path / "gpt-oss", "gpt_oss", head_dim=8)
    message = load_error(gpt_oss)
    assert "GptOssMLP" in message and "cannot adopt exactly" in message and "upcycle" not in message


def test_an_ep_that_does_not_divide_the_experts_is_refused_before_any_conversion(tmp_path):
    """It was 'num_experts=4 is not divisible by ep=3' (no fix), and for an HF directory only after rank 0 had
    converted the whole model into the cache (hours for a large one)."""
    groups = SimpleNamespace(size=lambda kind: 3, world_size=3)  # checked before any collective
    message = load_error(hf_dir(tmp_path / "hf"), groups)
    assert "--ep 3 does not divide the 4 experts of" in message and "(1, 2, 4)" in message
    from switchyard.serve.loading import check_ep

    check_ep(tmp_path, 4, 2)
    with pytest.raises(ValueError, match=r"--ep 4 does not divide the 6 experts .* \(1, 2, 3, 6\)"):
        check_ep(tmp_path, 6, 4)


def test_weights_unlike_the_config_are_an_error_not_a_traceback(tmp_path_factory, tmp_path):
    import switchyard as sy
    from switchyard.serve.loading import build_tiny_moe, load_for_serving

    base = tmp_path_factory.getbasetemp()
    model, tok = load_for_serving(build_tiny_moe(base / "serve-tiny-moe", base / "serve-cache"), None)
    exported = Path(sy.export_hf(model, tmp_path / "exported", tokenizer=tok))
    config = json.loads((exported / "config.json").read_text())
    config["intermediate_size"] *= 2
    (exported / "config.json").write_text(json.dumps(config))
    assert f"transformers could not load {exported}" in load_error(exported)


def _load_own_copy(dirs: list[str]) -> str:
    """Each rank loads its own copy of the model (multi-node: one per node); returns this rank's error."""
    import torch.distributed as dist

    import switchyard as sy
    from switchyard.serve.loading import load_for_serving

    groups = sy.ProcessGroupManager(ep=2, register_with_deepspeed=False)
    try:
        load_for_serving(Path(dirs[dist.get_rank()]), groups)
    except ValueError as err:
        return str(err)
    return "loaded"


def test_a_bad_file_only_one_rank_sees_stops_every_rank(tmp_path):
    """Rank 1's copy is truncated, rank 0's is whole: rank 1 stopped alone while rank 0 went on into the
    conversion and waited for it there."""
    good = add_tokenizer(hf_dir(tmp_path / "good"))
    cut = add_tokenizer(hf_dir(tmp_path / "cut"))
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:-8])
    rank0, rank1 = run_on_ranks(_load_own_copy, 2, [str(good), str(cut)], timeout_s=60)
    assert rank1.startswith(f"cannot read {cut / 'model.safetensors'}"), rank1
    assert rank0.startswith(f"checking {good} failed on rank 1: ValueError: cannot read"), rank0


def _groups_for(ep: int) -> str:
    from switchyard.serve.main import _process_groups

    try:
        _process_groups(ep)
    except ValueError as err:
        return str(err)
    return "built"


def test_an_ep_larger_than_the_ranks_names_the_flag_and_the_launcher():
    """The layout's message spoke of tp*dp and etp, which the server has no flags for."""
    messages = run_on_ranks(_groups_for, 2, 4, timeout_s=60)
    assert all("--ep 4 needs 4 ranks (or a multiple) but the launcher started 2" in m for m in messages), messages
    assert all("deepspeed --num_gpus 4 launch/serve.py" in m for m in messages), messages



def _serve_main(model: str, heartbeat_s: float) -> tuple[int, list[str]]:
    """``serve.main.run`` on this rank: (its exit code, the errors it logged)."""
    import logging

    from switchyard.serve.config import ServeConfig
    from switchyard.serve.main import run

    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())
    logging.getLogger("switchyard").addHandler(handler)
    return run(ServeConfig(model=model, ep=2, port=0, heartbeat_s=heartbeat_s)), errors


def test_settings_that_can_only_fail_are_refused_before_the_model_is_read(tmp_path, caplog):
    """``--max-model-len`` beyond the model's context was refused once the model had loaded, and a heartbeat rarer
    than half the collective timeout once it had loaded and warmed up (a large HF directory: after its
    conversion). Here the weights file is a stand-in that loading would reject, and the model does not exist."""
    from switchyard.serve.loading import load_for_serving

    path = add_tokenizer(hf_dir(tmp_path / "ctx", max_position_embeddings=256))
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's max_position_embeddings=256"):
        load_for_serving(path, None, max_model_len=4096)
    # every rank exits 2 before it looks for the (missing) model, naming the limit (half the ranks' timeout)
    for code, errors in run_on_ranks(_serve_main, 2, str(tmp_path / "missing"), 400.0, timeout_s=60):
        assert code == 2 and len(errors) == 1, errors
        assert re.match(r"serve: heartbeat_s=400 must be at most half the collective timeout \((\d+)s, "
                        r"SWITCHYARD_DIST_TIMEOUT_S\).* lower heartbeat_s to at most (\d+) ", errors[0]), errors

def _serve(args: list[str]) -> subprocess.CompletedProcess:
    return run_script(REPO_ROOT / "launch" / "serve.py", args, timeout_s=120)


def test_launch_serve_exits_2_with_one_line_before_binding_a_port(tmp_path):
    """A truncated HF weights file: a traceback and exit 1 before. A port in use: found only after the model had
    loaded (uvicorn's bind) — now before it is read, so here the model is not even looked at."""
    cut = hf_dir(tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-8])
    done = _serve(["--model", str(cut), "--port", "0"])
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert "serve: cannot read" in out and "Traceback" not in out and "Uvicorn running" not in out, out[-3000:]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _serve(["--model", str(tmp_path / "no-such-model"), "--port", str(port)])
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}" in out and "no config.json" not in out, out[-3000:]


@pytest.mark.distributed
def test_a_worker_dying_mid_request_gives_openai_errors_at_once_and_the_server_exits_nonzero(tmp_path_factory):
    """rank 1 killed while a plain and a streamed request are in flight: rank 0's next collective fails. uvicorn
    first waited its 10 s graceful shutdown for requests that could never finish; then it cancelled them, so the
    plain request got uvicorn's text/plain "Internal Server Error" and the stream was cut without a word. Now the
    plain request gets OpenAI's JSON error (500, ``engine_failed``, naming the dead rank), the stream ends with an
    error event (the ``openai`` client raises ``APIError`` with its message), both within seconds, and the launcher
    exits non-zero seconds later. Started with ``--port 0``: the log line names the port bound (it said 0)."""
    import re

    import psutil

    openai = pytest.importorskip("openai")
    from switchyard.serve.launcher import ServerProcess
    from switchyard.serve.loading import build_tiny_moe

    base = tmp_path_factory.getbasetemp()
    model_dir = build_tiny_moe(base / "serve-tiny-moe-long", base / "serve-cache", max_position_embeddings=512)
    with ServerProcess.start(model_dir, ep=2, args=["--port", "0"]) as server:  # the last --port wins
        deadline = time.monotonic() + 180
        while not (bound := re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/v1", server.output(60000))):
            assert server.proc.poll() is None and time.monotonic() < deadline, server.output()
            time.sleep(0.2)
        assert bound[1] != "0", server.output()
        server.base_url = f"http://127.0.0.1:{bound[1]}"
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=60)
        body = dict(model=model_dir.name, prompt="def f(x):", max_tokens=400, temperature=0,
                    extra_body={"ignore_eos": True})
        outcome: dict = {}

        def ask(stream: bool) -> None:
            name = "stream" if stream else "plain"
            try:
                if stream:
                    outcome[name] = [chunk for chunk in client.completions.create(**body, stream=True)]
                else:
                    outcome[name] = client.completions.create(**body)
            except Exception as err:  # noqa: BLE001 - what the client sees is the point
                outcome[name] = err
            outcome[f"{name}_at"] = time.monotonic()

        threads = [threading.Thread(target=ask, args=(stream,)) for stream in (False, True)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while "switchyard_num_requests_running 2.0" not in _metrics(server.base_url):  # both decoding
            assert time.monotonic() < deadline and not outcome, (outcome, server.output())
            time.sleep(0.05)
        rank1 = next(p for p in psutil.Process(server.proc.pid).children(recursive=True)
                     if "--local_rank=1" in p.cmdline())
        killed = time.monotonic()
        rank1.kill()
        for thread in threads:
            thread.join(30)
        dead = "an expert-parallel worker rank exited or stopped answering"
        plain, stream = outcome["plain"], outcome["stream"]
        assert isinstance(plain, openai.InternalServerError), (plain, server.output())
        assert plain.response.headers["content-type"] == "application/json", plain.response.text
        assert plain.body["type"] == "server_error" and plain.body["code"] == "engine_failed", plain.body
        assert plain.body["message"].startswith(dead) and "shutting down" in plain.body["message"], plain.body
        assert type(stream) is openai.APIError and stream.message == plain.body["message"], repr(stream)
        assert stream.body == plain.body, stream.body
        assert max(outcome["plain_at"], outcome["stream_at"]) - killed < 5, outcome
        code = server.proc.wait(timeout=30)
        assert code != 0 and time.monotonic() - killed < 15, server.output()
        assert "a step failed" in server.output(60000)


def _metrics(base_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:
        return response.read().decode()
