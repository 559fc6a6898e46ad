"""The `s2lpo` command line: resolved config, schedule table, error exit codes."""

import subprocess
import sys

import yaml

from megatron_s2lpo.cli import main


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "algo.group_size=8", "run.name=x"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["algo"]["group_size"] == 8 and out["run"]["name"] == "x"


def test_config_error_is_one_line_and_exit_code_2(capsys):
    assert main(["config", "algo.tmix=3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'algo.t_mix'" in err and "Traceback" not in err


def test_schedule_table_matches_split_group(capsys):
    assert main(["schedule", "--group-size", "16", "--t-mix", "9", "--steps", "10"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows[0] == ["1", "1.0000", "16", "0"]
    assert rows[1] == ["2", "0.8750", "14", "2"]
    assert rows[8] == ["9", "0.0000", "0", "16"]
    assert len(rows) == 10


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "megatron_s2lpo.cli", "schedule", "--t-mix", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "G_w" in proc.stdout


def test_convert_forwards_every_argument_to_the_tool(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["convert", "--help"])
    assert info.value.code == 0
    assert "hf-to-mcore" in capsys.readouterr().out


def test_convert_tool_errors_come_back_as_exit_code_2(tmp_path, capsys):
    code = main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "config.json" in capsys.readouterr().err


def test_eval_and_explore_explain_missing_inputs(tmp_path, capsys):
    assert main(["eval", "--models", str(tmp_path), "--k", "2"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["explore", "algo.t_mix=0"]) == 2
    assert "rollout.explorer_store is empty" in capsys.readouterr().err
