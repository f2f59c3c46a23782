"""The package as users get it: a wheel and an sdist that build, pass twine, and run from an empty venv."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

import ostinato

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"

APP = textwrap.dedent("""
    import os
    import ostinato

    app = ostinato.App("wheelcheck")

    @app.loop(pause="10ms")
    def tick(ctx: ostinato.Pass) -> None:
        with open(os.environ["TICKS"], "a") as f:
            f.write(f"{ctx.fence} {ctx.number}\\n")
""")


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, f"{argv} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built from this tree with the locked build tools."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)])
    return out


def test_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    """Both artifacts exist, carry the one version, and pass ``twine check --strict``."""
    wheels = list(dist.glob("ostinato-*.whl"))
    sdists = list(dist.glob("ostinato-*.tar.gz"))
    assert len(wheels) == 1, wheels
    assert len(sdists) == 1, sdists
    assert wheels[0].name.startswith(f"ostinato-{ostinato.__version__}-")
    run([sys.executable, "-m", "twine", "check", "--strict", str(wheels[0]), str(sdists[0])])
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "ostinato/py.typed" in names
    assert any(n.startswith("ostinato/dashboard_static/") for n in names)
    assert "License-Expression: MIT" in metadata
    assert not any(n.startswith(("tests/", "bench/", "examples/")) for n in names)


def test_the_wheel_runs_a_loop_from_an_empty_venv(dist: Path, tmp_path: Path) -> None:
    """A new venv with only the wheel and its locked runtime dependencies runs a loop on SQLite."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    run([*pip, "install", "--require-hashes", "--no-deps", "-r", str(RUNTIME_LOCK)])
    wheel = next(dist.glob("ostinato-*.whl"))
    run([*pip, "install", "--no-deps", str(wheel)])
    run([*pip, "check"])  # the wheel's declared dependencies are all there

    work = tmp_path / "work"
    work.mkdir()
    (work / "app.py").write_text(APP)
    # No PYTHONPATH and a folder away from the source tree: only the installed wheel can answer.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OSTINATO_", "VIRTUAL_ENV"))}
    env["TICKS"] = str(work / "ticks")
    ostinato_bin = str(venv / "bin" / "ostinato")

    where = run([str(venv / "bin" / "python"), "-c", "import ostinato; print(ostinato.__file__)"],
                cwd=work, env=env).stdout.strip()
    assert where.startswith(str(venv)), where
    version = run([ostinato_bin, "--version"], cwd=work, env=env).stdout
    assert version.split()[-1] == ostinato.__version__

    runner = subprocess.Popen([ostinato_bin, "run", "app.py:app"], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        ticks: list[str] = []
        while time.monotonic() < deadline and len(ticks) < 20:
            assert runner.poll() is None, runner.communicate()[0]
            time.sleep(0.1)
            ticks = (work / "ticks").read_text().split("\n")[:-1] if (work / "ticks").exists() else []
    finally:
        runner.terminate()
        output = runner.communicate(timeout=30)[0]
    assert runner.returncode == 0, output
    assert len(ticks) >= 20, output
    numbers = [int(line.split()[1]) for line in ticks]
    assert numbers[:20] == list(range(1, 21))  # one holder, its passes counted 1, 2, 3, ...
    assert (work / "ostinato.db").exists()  # the embedded default coordinator
