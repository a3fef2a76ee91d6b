"""The quickstart pipeline's plumbing on a minute preset (quality is shown by `make quickstart`)."""

from __future__ import annotations

import json

import pytest

from jaxft.errors import JaxftError
from jaxft.quickstart import run_quickstart
from jaxft.quickstart.corpus import build, schema


def test_corpus_is_deterministic_and_consistent():
    a, b = build(0, 20, 50, 10), build(0, 20, 50, 10)
    assert a == b
    import jsonschema

    for row in a["heldout"]:
        jsonschema.validate(row["expected"], schema())
    for p in a["pairs"]:  # chosen: the bare JSON answer; rejected: the same answer in filler
        answer = json.loads(p["chosen"])
        assert p["rejected"] != p["chosen"] and json.dumps(answer) in p["rejected"]
        with pytest.raises(json.JSONDecodeError):
            json.loads(p["rejected"])


def test_pipeline_runs_end_to_end_and_replaces_its_outputs(tmp_path, capsys):
    out = tmp_path / "qs"
    summary = run_quickstart(out, "smoke", progress=False)
    for key in ("tokenizer", "base", "adapter", "merged", "dpo_adapter", "sft_loss_plot",
                "dpo_plot", "samples"):
        assert (out / summary["paths"][key].split(str(out) + "/")[-1]).exists(), key
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "merged" / "model.safetensors").exists()
    assert set(summary["json_after"]) >= {"json_valid", "schema_valid", "filler", "exact_match"}
    assert "held-out requests" in capsys.readouterr().out
    run_quickstart(out, "smoke", progress=False)  # a second run replaces the first cleanly
    other = tmp_path / "not-quickstart"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(JaxftError, match="was not written by jaxft quickstart"):
        run_quickstart(other, "smoke", progress=False)
    assert (other / "precious.txt").exists()
