"""scripts/gpu_carry.sh: files split into parts for the device tool's per-call size limit are joined
back bit for bit, and a missing part is refused (never a half-unpacked asset)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_carry.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("split") is None, reason="needs bash and coreutils")
def test_pack_have_unpack_round_trip_and_a_missing_part_is_refused(tmp_path):
    # a copy of the script in a scratch checkout: it works in <checkout>/.gpu_carry
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "gpu_carry.sh")
    src = tmp_path / "assets"
    (src / "sub").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "small.txt").write_text("hi\n")
    env = {**os.environ, "GPU_CARRY_PART": "100K"}

    def run(*args):
        return subprocess.run(["bash", "scripts/gpu_carry.sh", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True)  # fmt: skip

    r = run("pack", "t", str(src))
    assert r.returncode == 0, r.stderr
    parts = sorted((tmp_path / ".gpu_carry").glob("t.tar.part*"))
    assert len(parts) >= 3 and all(p.stat().st_size <= 100 * 1024 for p in parts)
    assert f"call {len(parts)}/{len(parts)}" in r.stdout and "unpack t DEST" in r.stdout
    assert "t.tar.part00" in run("have", "t").stdout
    r = run("unpack", "t", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "assets" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert (tmp_path / "out" / "assets" / "sub" / "small.txt").read_text() == "hi\n"
    parts[1].unlink()
    r = run("unpack", "t", str(tmp_path / "out2"))
    assert r.returncode == 1 and "do not make the packed tar" in r.stderr
    assert not (tmp_path / "out2").exists()
    assert run("pack", "t", str(tmp_path / "nope")).returncode == 2
