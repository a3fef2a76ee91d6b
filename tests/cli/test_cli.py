"""The command line: help, one-line errors, and the commands that need no training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jaxft.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for cmd in ("quickstart", "train", "eval", "generate", "export", "plan", "data", "plot"):
        assert cmd in out


def test_bad_config_key_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim:\n  learning_rate: 1.0e-4\n")
    assert main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'optim.learning_rate'" in err[0]
    assert "valid keys here: lr," in err[0]


def test_plan_prints_memory(capsys):
    assert main(["plan", str(REPO / "configs" / "llama3-8b-qlora.yaml"), "model.path=null",
                 "--devices", "1"]) == 0
    out = capsys.readouterr().out
    assert "base parameters        8,030,261,248" in out and "GiB" in out


def test_plot_regenerates_pngs(tmp_path, capsys):
    rows = [{"step": i, "loss": 3.0 / i, "lr": 1e-3} for i in range(1, 10)]
    rows.append({"step": 9, "val_loss": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 5_000


def test_python_m_jaxft_and_no_import_side_effects():
    out = subprocess.run([sys.executable, "-c", "import sys, jaxft, jaxft.data, jaxft.config; "
                          "print('jax' in sys.modules, 'torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]
    help_out = subprocess.run([sys.executable, "-m", "jaxft", "--help"], capture_output=True,
                              text=True, cwd=REPO, check=True)
    assert "jaxft" in help_out.stdout
