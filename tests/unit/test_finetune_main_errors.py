"""What ``launch/finetune.py`` prints when the run stops early: every rank writes its error to the launcher's shared
stderr, so each message is one line in one write (two writes, the text and then print's newline, let two ranks' lines
run together), and Ctrl-C, which reaches every rank, is that one line and exit 130 instead of a traceback per rank."""

from __future__ import annotations

import importlib.util
import io

import pytest

from harness import REPO_ROOT


class _Writes(io.StringIO):
    """A stderr that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


@pytest.fixture
def launcher(monkeypatch):
    spec = importlib.util.spec_from_file_location("finetune_launcher", REPO_ROOT / "launch" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "check_world", lambda config: None)  # no process group in the test's process
    return module


def _run(launcher, monkeypatch, tmp_path, raised: BaseException) -> tuple[int, _Writes]:
    import switchyard.train.loop as loop

    def train(config):
        raise raised

    monkeypatch.setattr(loop, "train", train)
    stderr = _Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    code = launcher.main(["--config", str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml"), "parallel.ep=1",
                          f"output_dir={tmp_path / 'run'}"])
    return code, stderr


def test_ctrl_c_is_one_line_and_exit_130(launcher, monkeypatch, tmp_path):
    code, stderr = _run(launcher, monkeypatch, tmp_path, KeyboardInterrupt())
    assert code == 130
    assert stderr.calls == ["finetune: interrupted; the newest complete checkpoint in output_dir is intact: continue "
                            "with --resume auto\n"], stderr.calls


def test_an_error_found_while_building_is_one_write_of_one_line(launcher, monkeypatch, tmp_path):
    code, stderr = _run(launcher, monkeypatch, tmp_path, ValueError("data.path=/nowhere does not exist; fix it"))
    assert code == 2
    assert stderr.calls == ["finetune: error: data.path=/nowhere does not exist; fix it\n"], stderr.calls
    with pytest.raises(RuntimeError, match="a bug"):  # not a user mistake: its traceback is kept
        _run(launcher, monkeypatch, tmp_path, RuntimeError("a bug"))


def _hub_config(source: str):
    from switchyard.train.run_config import load_run_config

    return load_run_config(str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml"), [f"model.source={source}", "parallel.ep=1"])


def test_a_hub_that_does_not_answer_is_one_error_at_once(launcher, monkeypatch):
    """A hub id that is not in the cache while the hub does not answer: the error at once, not after transformers'
    download has retried for ~25 s."""
    import huggingface_hub
    import transformers
    from huggingface_hub import constants

    asked = []

    def silent(self, repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("timeout")))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(launcher, "_in_hub_cache", lambda key, repo_id: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", silent)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("went on to download"))
    with pytest.raises(ValueError, match=r"model\.source='nobody/nothing' is not a local directory nor in the hub "
                                         r"cache, and the hub does not answer \(ConnectionError: \[Errno -2\] Name"):
        launcher.check_hub_sources(_hub_config("nobody/nothing"))
    assert asked == [("nobody/nothing", 10)]


def test_a_hub_that_answers_or_a_cached_model_goes_on_to_transformers(launcher, monkeypatch):
    """The hub answered (here: the id is malformed), or the model is in the cache: transformers' load decides."""
    import huggingface_hub
    import transformers
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError

    def answered(self, repo_id, **kwargs):
        raise HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name'")

    def not_found(*args, **kwargs):
        raise OSError("nobody/nothing is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(launcher, "_in_hub_cache", lambda key, repo_id: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", answered)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", not_found)
    with pytest.raises(ValueError, match="is not a local directory, and fetching it from the hub failed"):
        launcher.check_hub_sources(_hub_config("nobody/nothing"))
    monkeypatch.setattr(launcher, "_in_hub_cache", lambda key, repo_id: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: object())
    launcher.check_hub_sources(_hub_config("nobody/nothing"))
