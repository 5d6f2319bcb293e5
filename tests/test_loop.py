"""The distillation loop: exact resume, Ctrl-C, checkpoints, multi-process, saved students, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import socket

import _tiny
import pytest
import torch

import fastkd
from fastkd.checkpoint import _flatten, _unflatten, find_latest
from fastkd.loop import DistillConfig, DistillError, distill, lr_at
from fastkd.models import evaluate, load_classifier, predict_logits


def _state(out_dir) -> dict:
    with open(os.path.join(find_latest(str(out_dir)), "state.json"), encoding="utf-8") as f:
        return json.load(f)


RESUME_CASES = [
    pytest.param("ood", {}, id="ood"),
    pytest.param("ood", {"balance": 32, "balance_cache": "none"}, id="ood-balance"),
    pytest.param("random", {}, id="random"),
    pytest.param("supervised", {}, id="supervised"),
    # min_gen_lift 0: this tests resume, not the generator's quality (test_method_generators does)
    pytest.param("zskd", {"gen_every": 2, "gen_steps": 1, "min_gen_lift": 0}, id="zskd-mlm"),
    pytest.param("zskd", {"generator": "embedding"}, id="zskd-embedding"),
    pytest.param("zskd", {"gen_every": 2, "gen_steps": 1, "min_gen_lift": 0, "adv_balance": "clean"}, id="zskd-balance"),
    pytest.param("asdfd", {"construct_steps": 2, "pool_size": 8}, id="asdfd"),
    pytest.param("t3", {**_tiny.T3_OPTIONS, "refresh_every": 2, "pool_size": 16}, id="t3"),
]


@pytest.fixture(scope="module")
def dropout_teacher():
    """The tiny teacher with dropout switched on in its config, so the student trains with dropout
    (the teacher itself runs in eval mode) and resume must restore the RNG."""
    model, tok = load_classifier(_tiny.teacher_dir())
    model.config.hidden_dropout_prob = 0.1
    model.config.attention_probs_dropout_prob = 0.1
    return model, tok


def _opts(method, options):
    return {**options, **({"generator": _tiny.causal_lm_dir()} if method == "t3" else {})}


def _student_state(out_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "student", "model.safetensors"))


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if not r.get("eval")]


# --------------------------------------------------------------------------------------------
# exact resume
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "options"), RESUME_CASES)
def test_stop_and_resume_equals_the_straight_run(tmp_path, dropout_teacher, method, options):
    teacher, tok = dropout_teacher
    kw = {"max_steps": 6, "method_options": _opts(method, options), "eval_every": 3}
    straight = distill(_tiny.config(method, tmp_path / "straight", **kw), teacher=teacher, tokenizer=tok)
    first = distill(_tiny.config(method, tmp_path / "split", stop_after=3, **kw), teacher=teacher, tokenizer=tok)
    assert first.steps == 3 and first.interrupted
    second = distill(_tiny.config(method, tmp_path / "split", resume=True, **kw), teacher=teacher, tokenizer=tok)
    assert second.steps == 6 and not second.interrupted
    a, b = _student_state(tmp_path / "straight"), _student_state(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "split")
    assert [h["step"] for h in second.history] == [3, 6]
    assert second.history == straight.history or all(
        math.isclose(x[k], y[k]) for x, y in zip(second.history, straight.history) for k in x if k != "wall_s"
    )


def test_ctrl_c_leaves_a_checkpoint_that_resumes(tmp_path, dropout_teacher, monkeypatch):
    teacher, tok = dropout_teacher
    from fastkd.methods.baselines import OutOfDomain

    kw = {"max_steps": 6}
    distill(_tiny.config("ood", tmp_path / "straight", **kw), teacher=teacher, tokenizer=tok)

    original = OutOfDomain.before_step

    def interrupt_at_step_2(self, step, generator):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return original(self, step, generator)

    monkeypatch.setattr(OutOfDomain, "before_step", interrupt_at_step_2)
    handler_before = signal.getsignal(signal.SIGINT)
    stopped = distill(_tiny.config("ood", tmp_path / "split", **kw), teacher=teacher, tokenizer=tok)
    assert stopped.interrupted and stopped.steps == 3  # the step in progress is finished, then it stops
    assert _state(tmp_path / "split")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    monkeypatch.setattr(OutOfDomain, "before_step", original)
    done = distill(_tiny.config("ood", tmp_path / "split", resume=True, **kw), teacher=teacher, tokenizer=tok)
    assert done.steps == 6 and not done.interrupted
    a, b = _student_state(tmp_path / "straight"), _student_state(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON only
# --------------------------------------------------------------------------------------------
def test_checkpoint_is_safetensors_and_json(tmp_path):
    distill(_tiny.config("zskd", tmp_path, max_steps=2, method_options={"gen_every": 1, "gen_steps": 1}))
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step-00000002"
    assert sorted(os.listdir(ckpt)) == ["manifest.json", "state.json", "student.safetensors", "trainer.safetensors"]
    for name in ("student.safetensors", "trainer.safetensors"):
        raw = (ckpt / name).read_bytes()
        header = int.from_bytes(raw[:8], "little")
        json.loads(raw[8 : 8 + header])  # the safetensors header: JSON, no pickle anywhere
        assert not raw.startswith(b"\x80")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["method"] == "zskd"
    assert "generator" in json.dumps(state["trainer"]["method"])  # the generator's weights and optimizer
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        logged = [json.loads(line) for line in f]
    assert all(r["gen_divergence"] > -1e-6 for r in logged if not r.get("eval"))  # the generator's own numbers


def test_flatten_round_trip():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    tree_in = {"optimizer": opt.state_dict(), "pair": (1, "a", None), "nested": [{"x": torch.arange(3)}], "f": 0.5}
    tensors: dict = {}
    tree = _flatten(tree_in, "t", tensors)
    json.dumps(tree)
    back = _unflatten(json.loads(json.dumps(tree)), tensors)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(back["optimizer"])  # int keys survive
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["pair"] == (1, "a", None) and torch.equal(back["nested"][0]["x"], torch.arange(3))
    with pytest.raises(TypeError, match="cannot checkpoint a set"):
        _flatten({"s": {1, 2}}, "t", {})


def test_resume_rules(tmp_path):
    distill(_tiny.config("ood", tmp_path, max_steps=2))
    with pytest.raises(DistillError, match=r"already holds a checkpoint.*--resume.*--overwrite"):
        distill(_tiny.config("ood", tmp_path, max_steps=2))
    with pytest.raises(DistillError, match=r"different configuration \(lr: 0.005 -> 0.001"):
        distill(_tiny.config("ood", tmp_path, max_steps=2, lr=1e-3, resume=True))
    with pytest.raises(DistillError, match="exclude each other"):
        distill(_tiny.config("ood", tmp_path, resume=True, overwrite=True))
    # runtime options may change on resume; a finished run resumes to the same student
    again = distill(_tiny.config("ood", tmp_path, max_steps=2, resume=True, eval_every=1, log_every=2))
    assert again.steps == 2
    fresh = distill(_tiny.config("ood", tmp_path, max_steps=1, overwrite=True))
    assert fresh.steps == 1


# --------------------------------------------------------------------------------------------
# results, the saved student, metrics
# --------------------------------------------------------------------------------------------
def test_saved_student_loads_with_pipeline(tmp_path):
    from transformers import pipeline

    result = distill(_tiny.config("ood", tmp_path, max_steps=20, eval_every=10, student_init="auto"))
    assert result.student_dir == str(tmp_path / "student")
    clf = pipeline("text-classification", model=result.student_dir, device="cpu")
    out = clf(["good great film", "awful boring plot"])
    assert [o["label"] for o in out] == ["positive", "negative"]
    assert 0 < result.student_params < result.teacher_params
    assert result.student_dims == {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}
    assert set(result.final) == {"accuracy", "macro_f1", "mcc", "agreement", "kl_to_teacher"}
    assert result.teacher_metrics["accuracy"] == 1.0
    assert [h["step"] for h in result.history] == [10, 20]
    assert all({"step", "loss", "accuracy", "macro_f1", "mcc", "wall_s"} <= set(h) for h in result.history)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["final"] == result.final and saved["config"]["method"] == "ood"
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if not r.get("eval")]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert all(r["rows_per_s"] > 0 and "kd_ood" in r and "lr" in r for r in train)


def test_progress_bar_shows_loss_throughput_and_eta(tmp_path, capsys):
    distill(_tiny.config("ood", tmp_path, max_steps=3, progress=True))
    err = capsys.readouterr().err
    assert "distill ood" in err and "loss=" in err and "rows_s=" in err and "<" in err  # tqdm's ETA: elapsed<remaining


def test_grad_accumulation_matches_the_full_batch(tmp_path):
    a = distill(_tiny.config("ood", tmp_path / "a", max_steps=3, batch_size=8))
    b = distill(_tiny.config("ood", tmp_path / "b", max_steps=3, batch_size=8, grad_accum=2))
    sa, sb = _student_state(a.out_dir), _student_state(b.out_dir)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


def test_evaluate_and_predict_keep_row_order():
    model, tok = load_classifier(_tiny.teacher_dir())
    rows = _tiny.task_rows(13, seed=8)
    logits = predict_logits(model, tok, rows, batch_size=4, max_length=24)
    for i in (0, 5, 12):
        enc = fastkd.data.encode(tok, [rows[i]["text"]], max_length=24)
        with torch.no_grad():
            assert torch.allclose(logits[i], model(**enc).logits[0], atol=1e-5)
    m = evaluate(model, tok, rows, batch_size=5, max_length=24)
    assert m["accuracy"] == 1.0 and m["mcc"] == 1.0


def test_lr_schedule():
    cfg = DistillConfig(teacher="x", lr=1.0, max_steps=110, warmup_steps=10)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(10, cfg) == 1.0 and lr_at(60, cfg) == pytest.approx(0.5) and lr_at(110, cfg) == 0.0
    cfg.schedule = "cosine"
    assert lr_at(60, cfg) == pytest.approx(0.5) and lr_at(35, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    cfg.schedule = "constant"
    assert lr_at(100, cfg) == 1.0
    assert lr_at(0, DistillConfig(teacher="x", lr=1.0, max_steps=100)) == pytest.approx(1 / 6)  # 6% warmup


def test_hidden_matching_with_a_narrow_student(tmp_path):
    result = distill(
        _tiny.config("ood", tmp_path, max_steps=30, student_hidden=16, hidden_weight=1.0, log_every=5, save_every=10)
    )
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        hidden = [r["hidden"] for r in map(json.loads, f) if "hidden" in r]
    assert len(hidden) == 6 and hidden[-1] < hidden[0]
    assert result.student_dims["hidden"] == 16
    state = _state(tmp_path)
    assert state["trainer"]["matcher"]  # the projections are checkpointed with the student


# --------------------------------------------------------------------------------------------
# several processes (gloo, CPU): the same as one process with the same global batch
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
         "LOCAL_RANK": str(rank)}
    )  # fmt: skip
    result = distill(DistillConfig(**cfg_dict))
    assert result.steps == cfg_dict["max_steps"]
    assert (result.student_dir is not None) == (rank == 0)  # only rank 0 saves


def test_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    kw = {"max_steps": 4, "batch_size": 8, "eval_every": 2, "student_init": "auto"}
    single = distill(_tiny.config("ood", tmp_path / "single", **kw))
    cfg = _tiny.config("ood", tmp_path / "ddp", **kw)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict()), nprocs=2, join=True)
    a, b = _student_state(single.out_dir), _student_state(cfg.out_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    ddp_result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert [h["step"] for h in ddp_result["history"]] == [2, 4]  # rank 0 evaluated and logged
    assert ddp_result["final"]["accuracy"] == pytest.approx(single.final["accuracy"])
    # the logged loss is the mean over both ranks' shards, i.e. the single process's loss (it used to
    # be rank 0's shard alone, up to a third off)
    for (sa, la), (sb, lb) in zip(_losses(single.out_dir), _losses(cfg.out_dir), strict=True):
        assert sa == sb and la == pytest.approx(lb, rel=1e-4, abs=1e-6)


def _generator_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    from fastkd.methods import zskd

    captured = {}
    original = zskd.ZeroShotKD.setup

    def setup(self):
        original(self)
        captured["method"] = self

    zskd.ZeroShotKD.setup = setup
    _ddp_worker(rank, world, port, cfg_dict)
    gen = captured["method"].gen_params
    torch.save([p.detach().clone() for p in gen], os.path.join(out, f"gen{rank}.pt"))


def test_adversarial_generator_is_trained_in_sync_across_processes(tmp_path):
    """zskd's generator updates average their gradients over the ranks: both ranks end with the same
    generator (and the run does not deadlock)."""
    import torch.multiprocessing as mp

    cfg = _tiny.config(
        "zskd", tmp_path / "ddp", max_steps=3, batch_size=8, method_options={"gen_every": 1, "gen_steps": 2}
    )
    ctx = mp.start_processes(_generator_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")  # fmt: skip
    import time

    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):  # True once every process has exited (an error in one re-raises here)
        if time.monotonic() > deadline:  # pragma: no cover - a deadlock
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two processes did not finish within 300 s")
    g0 = torch.load(tmp_path / "gen0.pt")
    g1 = torch.load(tmp_path / "gen1.pt")
    assert len(g0) == len(g1) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


# --------------------------------------------------------------------------------------------
# bad input: clear errors before any work
# --------------------------------------------------------------------------------------------
def _not_a_classifier(tmp_path) -> str:
    from transformers import BertModel

    d = str(tmp_path / "encoder")
    BertModel(_tiny.bert_config(64)).save_pretrained(d)
    return d


def _bad_eval(tmp_path) -> str:
    return _tiny.write_rows(str(tmp_path / "three.jsonl"), [{"text": "good", "label": k} for k in range(3)])


def _empty(tmp_path) -> str:
    p = tmp_path / "empty.txt"
    p.write_text("\n\n", encoding="utf-8")
    return str(p)


BAD = [
    ("missing teacher", lambda t: {"teacher": str(t / "nope")}, "does not exist"),
    ("teacher is a file", lambda t: {"teacher": _tiny.data_files()["ood"]}, "is a file"),
    ("teacher folder without config", lambda t: {"teacher": str(t)}, "has no config.json"),
    ("not a classifier", lambda t: {"teacher": _not_a_classifier(t)}, "not a sequence classifier"),
    ("label count", lambda t: {"eval": _bad_eval(t)}, r"has labels \[2\] but the teacher has 2 classes"),
    ("student too big", lambda t: {"student_layers": 3, "student_hidden": 64}, "not smaller than the teacher"),
    ("student heads", lambda t: {"student_hidden": 30, "student_heads": 4}, "divisible"),
    ("unknown method", lambda t: {"method": "magic"}, "unknown method 'magic'"),
    ("unknown option", lambda t: {"method_options": {"bogus": 1}}, "unknown option 'bogus'"),
    ("empty ood", lambda t: {"ood": _empty(t)}, "is empty"),
    ("missing ood", lambda t: {"ood": str(t / "missing.txt")}, "no such file"),
    ("no ood", lambda t: {"method": "zskd", "ood": None}, "needs out-of-domain text"),
    ("supervised without train", lambda t: {"method": "supervised", "train": None}, "needs the labeled training"),
    ("accumulation", lambda t: {"batch_size": 9, "grad_accum": 2}, "divisible by processes x grad_accum"),
    ("lr", lambda t: {"lr": 0.0}, "lr must be a finite number > 0"),
    ("temperature", lambda t: {"temperature": -1.0}, "temperature must be a finite number > 0"),
    ("steps", lambda t: {"max_steps": 0}, "max_steps must be an integer > 0"),
    ("schedule", lambda t: {"schedule": "step"}, "schedule must be one of"),
    ("device", lambda t: {"device": "tpu9"}, "not a torch device"),
]


@pytest.mark.parametrize(("change", "match"), [pytest.param(c, m, id=n) for n, c, m in BAD])
def test_bad_input_fails_before_any_work(tmp_path, change, match):
    out = tmp_path / "out"
    kw = change(tmp_path)
    cfg = _tiny.config(kw.pop("method", "ood"), out, **kw)
    with pytest.raises(DistillError, match=match):
        distill(cfg)
    assert not out.exists()  # nothing was written


def test_config_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("teacher: t\nmethod: ood\nmax-steps: 7\nmethod_options:\n  min_tokens: 3\n", encoding="utf-8")
    cfg = DistillConfig.from_file(str(y))
    assert (cfg.teacher, cfg.method, cfg.max_steps, cfg.method_options) == ("t", "ood", 7, {"min_tokens": 3})
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"teacher": "t", "lr": 0.1}), encoding="utf-8")
    assert DistillConfig.from_file(str(j)).lr == 0.1
    j.write_text(json.dumps({"teacher": "t", "learning_rate": 0.1}), encoding="utf-8")
    with pytest.raises(DistillError, match=r"unknown option\(s\) \['learning_rate'\]"):
        DistillConfig.from_file(str(j))
    j.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DistillError, match="must hold a mapping"):
        DistillConfig.from_file(str(j))
    with pytest.raises(DistillError, match="cannot read config file"):
        DistillConfig.from_file(str(tmp_path / "none.yaml"))


# --------------------------------------------------------------------------------------------
# crash safety of the checkpoint writer, resume rules, guards (the reliability issue)
# --------------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


def _count_file_ops(monkeypatch):
    """Wrap the checkpoint writer's file operations; return a list that records each call."""
    from fastkd import checkpoint as ck

    calls: list[str] = []
    for name in ("_write_bytes", "_replace", "_rmtree", "_fsync_dir"):
        real = getattr(ck, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls.append(_name)
            if calls.count("!") == 0 and len(calls) == getattr(wrapped_budget, "n", 10**9):
                calls.append("!")
                raise _Crash(f"crash before {_name}")
            return _real(*a, **k)

        monkeypatch.setattr(ck, name, wrapped)
    return calls


class wrapped_budget:
    n = 10**9


def test_a_crash_between_any_two_checkpoint_file_operations_loses_at_most_save_every_steps(tmp_path, monkeypatch):
    """Inject a crash before each file operation of the writer in turn (while it writes the step-4
    checkpoint over the step-2 one): resume always finds a complete checkpoint of step 2 or 4."""
    from fastkd import checkpoint as ck

    base = tmp_path / "base"
    distill(_tiny.config("ood", base, max_steps=2, save_every=2))
    student = load_classifier(str(base / "student"))[0]
    trainer = ck.load(find_latest(str(base)), student)["trainer"]
    info = {k: v for k, v in ck.load(find_latest(str(base)), student).items() if k != "trainer"}
    calls = _count_file_ops(monkeypatch)
    ck.save(str(tmp_path / "probe"), student, trainer, {**info, "step": 4})
    n_ops = len(calls)
    assert n_ops >= 8
    for k in range(1, n_ops + 1):
        run = tmp_path / f"crash{k}"
        import shutil

        shutil.copytree(base, run)
        wrapped_budget.n = k
        calls.clear()
        with pytest.raises(_Crash):
            ck.save(str(run), student, trainer, {**info, "step": 4})
        wrapped_budget.n = 10**9
        latest = find_latest(str(run))
        assert latest is not None, f"crash before file operation {k}: no complete checkpoint left"
        assert _state(run)["step"] in (2, 4)
        ck.load(latest, student)  # loads and verifies


def test_resume_finds_the_newest_complete_checkpoint_after_a_crash_between_renames(tmp_path):
    """The old writer's failure: a crash between its two renames left checkpoint.old and
    checkpoint.tmp, and --resume silently started from step 0. Both are found now."""
    import shutil

    cfg = dict(max_steps=10, save_every=5)
    distill(_tiny.config("ood", tmp_path / "run", stop_after=5, **cfg))
    latest = find_latest(str(tmp_path / "run"))
    # the legacy layout after the crash: a complete checkpoint under each temporary name
    shutil.copytree(latest, tmp_path / "run" / "checkpoint.tmp")
    shutil.move(latest, tmp_path / "run" / "checkpoint.old")
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    done = distill(_tiny.config("ood", tmp_path / "run", resume=True, **cfg))
    assert done.steps == 10
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        steps = [r["step"] for r in map(json.loads, f) if not r.get("eval")]
    assert steps == list(range(1, 11))  # nothing was cut: it resumed at 5, not 0


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    from fastkd.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"holds no checkpoint.*drop --resume"):
        distill(_tiny.config("ood", tmp_path / "empty", max_steps=2, resume=True))


def test_a_corrupt_or_edited_checkpoint_is_refused_with_one_line(tmp_path):
    from fastkd.errors import CheckpointError

    distill(_tiny.config("ood", tmp_path, max_steps=2, save_every=2))
    folder = find_latest(str(tmp_path))
    state = json.loads(open(os.path.join(folder, "state.json")).read())
    state["step"] = 99
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f)
    with pytest.raises(CheckpointError, match=r"only incomplete or corrupt checkpoints.*does not match its checksum"):
        distill(_tiny.config("ood", tmp_path, max_steps=4, resume=True))


@pytest.mark.parametrize("kind", ["file", "under_file", "read_only"])
def test_an_unusable_out_dir_fails_before_training(tmp_path, kind):
    if kind == "file":
        out = tmp_path / "f"
        out.write_text("x")
    elif kind == "under_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; the file cases cover the check")
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    with pytest.raises(DistillError, match="out_dir"):
        distill(_tiny.config("ood", out, max_steps=2))


@pytest.mark.parametrize("lr", [math.inf, math.nan, -1.0])
def test_non_finite_or_negative_hyper_parameters_are_refused(tmp_path, lr):
    with pytest.raises(DistillError, match="lr must be a finite number"):
        distill(_tiny.config("ood", tmp_path, max_steps=2, lr=lr))


def test_a_diverging_run_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    from fastkd.errors import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match=r"step \d+: the .*non-finite.*last good checkpoint"):
        distill(_tiny.config("ood", tmp_path / "a", max_steps=8, save_every=1, lr=1e30, max_grad_norm=0.0))
    state = _state(tmp_path / "a")
    s = load_classifier(str(_tiny.teacher_dir()))[0]  # noqa: F841 - the teacher still loads
    from safetensors.torch import load_file

    weights = load_file(os.path.join(find_latest(str(tmp_path / "a")), "student.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values()), f"checkpoint of step {state['step']} is not finite"
    skipped = distill(
        _tiny.config("ood", tmp_path / "b", max_steps=4, lr=1e30, max_grad_norm=0.0, on_nonfinite="skip")
    )
    assert skipped.steps == 4


def test_teacher_outputs_stack_views_of_one_shape():
    """zskd's clean and refilled views go through one teacher forward; each view's logits and hidden
    states equal those of its own forward (the teacher is in eval mode; rows do not interact)."""
    import contextlib
    from types import SimpleNamespace

    from fastkd.loop import teacher_outputs
    from fastkd.methods.base import MethodContext, View

    teacher, _ = load_classifier(_tiny.teacher_dir())
    ns = SimpleNamespace(bridge=None, autocast=contextlib.nullcontext)
    ctx = SimpleNamespace(forward=lambda model, view, side, hidden=False: MethodContext.forward(
        ns, model, view, side, hidden=hidden))  # fmt: skip
    ns.model_inputs = lambda m, v, side: MethodContext.model_inputs(ns, m, v, side)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, teacher.config.vocab_size, (2, 6, 12), generator=g)
    mask = torch.ones(2, 6, 12, dtype=torch.long)
    mask[0, :2, 9:] = 0
    views = [View(attention_mask=mask[i], input_ids=ids[i]) for i in range(2)]
    for hidden in (False, True):
        got = teacher_outputs(ctx, teacher, views, hidden)
        for v, out in zip(views, got):
            with torch.no_grad():
                own = teacher(input_ids=v.input_ids, attention_mask=v.attention_mask, output_hidden_states=hidden)
            torch.testing.assert_close(out.logits, own.logits, rtol=1e-6, atol=1e-6)
            if hidden:
                assert len(out.hidden_states) == len(own.hidden_states)
                for a, b in zip(out.hidden_states, own.hidden_states):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # views of different lengths are not stacked: each gets its own forward
    short = View(attention_mask=mask[1][:, :8], input_ids=ids[1][:, :8])
    got = teacher_outputs(ctx, teacher, [views[0], short], False)
    assert got[1].logits.shape == (6, teacher.config.num_labels)
