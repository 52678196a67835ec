"""A model directory without a usable tokenizer, or a fine-tune checkpoint's directory passed for its model, is
refused with the directory and the fix named: transformers 5 loads a directory without tokenizer files as an empty
tokenizer (a fine-tune then trains on end-of-sequence tokens only; a server answers every prompt as empty)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from switchyard.cli import check_model_dir
from switchyard.hf.tokenizer import load_tokenizer
from switchyard.serve.loading import load_tokenizer as serve_tokenizer
from switchyard.serve.loading import resolve_model_dir


def test_a_directory_without_tokenizer_files_is_refused_by_the_fine_tune_and_the_server(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match=rf"{tmp_path} has no tokenizer files .*: name one with model.tokenizer"):
        load_tokenizer(tmp_path, "name one with model.tokenizer")
    with pytest.raises(ValueError, match=r"has no tokenizer files .*save_pretrained\("):
        serve_tokenizer(tmp_path)


def test_an_empty_tokenizer_is_refused(tmp_path):
    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"<eos>": 0}, merges=[])),
                                    eos_token="<eos>")
    empty.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"into no tokens \(1 in its vocabulary: an empty tokenizer\): the fix"):
        load_tokenizer(tmp_path, "the fix")


def test_a_checkpoint_directory_points_at_its_model(tmp_path):
    step = tmp_path / "checkpoints" / "step_000008"
    (step / "model").mkdir(parents=True)
    (step / "model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"model.source='{step}': .* no config.json.* pass its model directory, "
                                         rf"{step / 'model'}"):
        check_model_dir(str(step), "model.source")
    with pytest.raises(ValueError, match=r"run directory: pass a checkpoint's model directory, e.g. .*step_000008"):
        check_model_dir(str(tmp_path), "--model")
    with pytest.raises(ValueError, match=rf"no config.json there.* pass its model directory, {step / 'model'}"):
        resolve_model_dir(str(step))
