"""The ``fastkd`` command line: distill (with --config), eval, generate, help, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import _tiny
import pytest

from fastkd.cli import MODULE_COMMANDS, build_parser, main
from fastkd.data import load_labeled, load_text
from fastkd.loop import DistillConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _common(out_dir) -> list[str]:
    files = _tiny.data_files()
    return [
        "--teacher", _tiny.teacher_dir(), "--ood", files["ood"], "--eval", files["eval"], "--out-dir", str(out_dir),
        "--max-length", "24", "--batch-size", "8", "--threads", "1", "--no-progress", "--student-layers", "1",
    ]  # fmt: skip


def _last_json(text: str) -> dict:
    start = text.rindex("\n{") + 1 if "\n{" in text else text.index("{")
    return json.loads(text[start:])


def test_distill_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["distill", *_common(out), "--method", "ood", "--max-steps", "4", "--eval-every", "2", "--lr", "5e-3"])
    assert code == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["student_dir"] == str(out / "student")
    assert set(summary["final"]) >= {"accuracy", "macro_f1", "mcc"}
    assert summary["student_params"] < summary["teacher_params"]
    code = main(["eval", "--model", str(out / "student"), "--data", _tiny.data_files()["eval"], "--device", "cpu"])
    assert code == 0
    scored = _last_json(capsys.readouterr().out)
    assert scored["accuracy"] == pytest.approx(summary["final"]["accuracy"])
    assert scored["rows"] == 96 and scored["parameters"] == summary["student_params"]


def test_method_options_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "method: zskd\nmax_steps: 3\nlr: 0.001\nmethod_options:\n  gen_every: 2\n  gen_steps: 1\n  mask_prob: 0.5\n"
        "  min_gen_lift: 0\n",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    # the command line overrides the file: 2 steps, mask_prob 0.4; gen_every stays from the file
    code = main(["distill", "--config", str(cfg), *_common(out), "--max-steps", "2", "-O", "mask_prob=0.4"])
    assert code == 0
    saved = json.loads((out / "result.json").read_text())["config"]
    assert saved["max_steps"] == 2 and saved["lr"] == 0.001 and saved["method"] == "zskd"
    assert saved["method_options"] == {"gen_every": 2, "gen_steps": 1, "mask_prob": "0.4", "min_gen_lift": 0}
    jcfg = tmp_path / "run.json"
    jcfg.write_text(json.dumps({"method": "random", "max-steps": 1}), encoding="utf-8")
    assert main(["distill", "--config", str(jcfg), *_common(tmp_path / "j")]) == 0
    assert json.loads((tmp_path / "j" / "result.json").read_text())["steps"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "ood", "-O", "nokey"], "must look like KEY=VALUE"),
        (["--method", "ood", "-O", "foo=1"], "unknown option 'foo' for method 'ood'"),
        (["--method", "zskd", "-O", "mask_prob=2"], "mask_prob must be in"),
        (["--method", "ood", "--student-layers", "4", "--student-hidden", "64"], "not smaller than the teacher"),
    ],
)
def test_distill_errors_exit_2_with_a_message(tmp_path, capsys, argv, message):
    code = main(["distill", *_common(tmp_path / "x"), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert "fastkd distill: error:" in err and message in err
    assert not (tmp_path / "x").exists()


def test_unknown_config_key_and_missing_teacher(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: x\nlearning_rate: 1\n", encoding="utf-8")
    assert main(["distill", "--config", str(bad)]) == 2
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err
    assert main(["distill", "--method", "random"]) == 2
    assert "no teacher given" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", _tiny.data_files()["eval"]]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_argparse_rejects_unknown_method_and_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--method", "magic"])
    assert e.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--no-such-flag"])


def test_generate_writes_reusable_jsonl(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    argv = [
        "generate", "--teacher", _tiny.teacher_dir(), "--ood", _tiny.data_files()["ood"], "--generator",
        _tiny.causal_lm_dir(), "--out", str(out), "--num-rows", "12", "--no-progress", "--device", "cpu",
        "-O", "tune_steps=1", "-O", "tune_batch=4", "-O", "max_new_tokens=8",
    ]  # fmt: skip
    assert main(argv) == 0
    info = _last_json(capsys.readouterr().out)
    assert info["rows"] == 12 and sum(info["teacher_label_counts"]) == 12
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and all(r["text"] for r in rows)
    assert len(load_text(str(out))) == 12 and len(load_labeled(str(out))) == 12  # OOD text or labeled data
    # reuse: distil another student on the generated text with the plain OOD method
    code = main(["distill", *_common(tmp_path / "reuse"), "--method", "ood", "--ood", str(out), "--max-steps", "2"])
    assert code == 0
    # and as T3's starting pool
    code = main(
        ["distill", *_common(tmp_path / "pool"), "--method", "t3", "--max-steps", "2", "-O",
         f"generator={_tiny.causal_lm_dir()}", "-O", f"pool_file={out}", "-O", "refresh_every=0"]
    )  # fmt: skip
    assert code == 0
    assert main(["generate", "--teacher", _tiny.teacher_dir(), "--ood", "x", "--out", str(out)]) == 2
    assert "--generator" in capsys.readouterr().err


def test_generate_cache_reuses_the_rows_of_the_same_settings(tmp_path, capsys):
    def gen(out, rows="6", seed="0"):
        argv = [
            "generate", "--teacher", _tiny.teacher_dir(), "--ood", _tiny.data_files()["ood"], "--generator",
            _tiny.causal_lm_dir(), "--out", str(out), "--num-rows", rows, "--no-progress", "--device", "cpu",
            "--cache", str(tmp_path / "cache"), "--seed", seed, "-O", "tune_steps=1", "-O", "tune_batch=2",
            "-O", "max_new_tokens=4",
        ]  # fmt: skip
        assert main(argv) == 0
        return _last_json(capsys.readouterr().out)

    first, again = gen(tmp_path / "a.jsonl"), gen(tmp_path / "b.jsonl")
    assert first["cached"] is False and again["cached"] is True
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert len(list((tmp_path / "cache").glob("t3-*.jsonl"))) == 1
    other = gen(tmp_path / "c.jsonl", seed="1")  # other settings: generated anew, kept beside
    assert other["cached"] is False and len(list((tmp_path / "cache").glob("t3-*.jsonl"))) == 2


def test_help_explains_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(DistillConfig):
        if f.name == "method_options":
            assert "--method-option KEY=VALUE" in text
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
    assert text.count("(default") >= len(dataclasses.fields(DistillConfig)) - 2  # teacher is required
    for method_option in ("mask_prob = 0.3", "construct_steps = 5", "tune_steps = 4", "min_tokens = 4"):
        assert method_option in text
    for sub in ("eval", "generate"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        sub_text = capsys.readouterr().out
        assert "(default" in sub_text and "--device" in sub_text


def test_every_subcommand_is_always_there():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"distill", "eval", "generate", *MODULE_COMMANDS} <= set(sub.choices)


def test_python_dash_m_fastkd():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "fastkd", "--help"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "distill" in res.stdout and "generate" in res.stdout and "eval" in res.stdout


# --------------------------------------------------------------------------------------------
# bad input on the command line: exit status 2, one line on stderr, no traceback
# --------------------------------------------------------------------------------------------
def _corrupt_checkpoint(tmp_path, how):
    out = tmp_path / "run"
    assert main(["distill", *_common(out), "--method", "ood", "--max-steps", "2", "--save-every", "1"]) == 0
    from fastkd.checkpoint import find_latest

    folder = find_latest(str(out))
    if how == "truncated":
        p = os.path.join(folder, "student.safetensors")
        with open(p, "r+b") as f:
            f.truncate(100)
    else:
        with open(os.path.join(folder, "state.json"), "w") as f:
            f.write("{not json")
    return out


def _bad_cli_cases():
    yield "garbage config", lambda t: ["distill", "--config", _write(t / "c.yaml", "::: [\n"), *_common(t / "o")], "cannot parse config"
    yield "binary config", lambda t: ["distill", "--config", _write(t / "c.yaml", b"\xff\xfe\x00"), *_common(t / "o")], "cannot read config"
    yield "method_options 3", lambda t: ["distill", "--config", _write(t / "c.yaml", "method_options: 3\n"), *_common(t / "o")], "method_options"
    yield "threads -1", lambda t: ["distill", *_common(t / "o"), "--threads", "-1"], "threads must be an integer"
    yield "seed 2**70", lambda t: ["distill", *_common(t / "o"), "--seed", str(2**70)], "seed must be an integer in"
    yield "lr inf", lambda t: ["distill", *_common(t / "o"), "--lr", "inf"], "lr must be a finite number"
    yield "lr 1e30 nan step", lambda t: ["distill", *_common(t / "o"), "--method", "ood", "--lr", "1e30", "--max-grad-norm", "0", "--max-steps", "6"], "non-finite"
    yield "warmup -1", lambda t: ["distill", *_common(t / "o"), "--warmup-steps", "-1"], "warmup_steps must be"
    yield "eval-max-rows 0", lambda t: ["distill", *_common(t / "o"), "--eval-max-rows", "0"], "eval_max_rows must be"
    yield "max-length too long", lambda t: ["distill", *_common(t / "o"), "--max-length", "100000"], "position embeddings"
    yield "temperature 1e30", lambda t: ["distill", *_common(t / "o"), "--temperature", "1e30"], "temperature must be at most"
    yield "resume without checkpoint", lambda t: ["distill", *_common(t / "o"), "--resume"], "holds no checkpoint"
    yield "out-dir is a file", lambda t: ["distill", *_common(_write(t / "f", "x"))], "is a file"
    yield "out-dir under a file", lambda t: ["distill", *_common(t / "f2" / "run")] if _write(t / "f2", "x") else [], "is a file"
    yield "truncated checkpoint", lambda t: ["distill", *_common(_corrupt_checkpoint(t, "truncated")), "--method", "ood", "--max-steps", "4", "--resume"], "corrupt checkpoints"
    yield "invalid state.json", lambda t: ["distill", *_common(_corrupt_checkpoint(t, "state")), "--method", "ood", "--max-steps", "4", "--resume"], "corrupt checkpoints"
    yield "eval batch-size 0", lambda t: ["eval", "--model", _tiny.teacher_dir(), "--data", _tiny.data_files()["eval"], "--batch-size", "0"], "--batch-size must be"
    yield "eval limit -1", lambda t: ["eval", "--model", _tiny.teacher_dir(), "--data", _tiny.data_files()["eval"], "--limit", "-1"], "--limit must be"


def _write(path, content):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as f:
        f.write(content)
    return str(path)


@pytest.mark.parametrize(("make_argv", "message"), [pytest.param(a, m, id=n) for n, a, m in _bad_cli_cases()])
def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, capsys, make_argv, message):
    argv = make_argv(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastkd {argv[0]}: error:") and message in lines[0], lines[0]
    assert "Traceback" not in err
