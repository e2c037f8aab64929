"""Shared fixtures: the bundled DAVIS sample, builders of small synthetic datasets on disk, and the fault
injection that kills a run after a chosen write of its state."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.manual_seed(0)

import promptopt.run as run_module  # noqa: E402
from promptopt.data import bundled_sample_root  # noqa: E402


# --- killing a run after its n-th state write (in process) ----------------------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL: a BaseException that nothing in promptopt catches or cleans up after."""


def count_state_writes(monkeypatch: pytest.MonkeyPatch, fn) -> tuple[int, object]:
    """Run ``fn()`` uninterrupted; return how many times it wrote its run state, and what it returned."""
    seen: list[int] = []
    monkeypatch.setattr(run_module, "_saves", 0)
    monkeypatch.setattr(run_module, "fault_hook", seen.append)
    try:
        value = fn()
    finally:
        monkeypatch.setattr(run_module, "fault_hook", None)
    return len(seen), value


def kill_after_state_write(monkeypatch: pytest.MonkeyPatch, n: int, fn) -> None:
    """Run ``fn()`` and kill it (raise :class:`Killed`) right after its n-th state write; fail if it finishes first."""
    def kill(count: int) -> None:
        if count == n:
            raise Killed

    monkeypatch.setattr(run_module, "_saves", 0)
    monkeypatch.setattr(run_module, "fault_hook", kill)
    try:
        with pytest.raises(Killed):
            fn()
    finally:
        monkeypatch.setattr(run_module, "fault_hook", None)


@pytest.fixture(scope="session")
def sample_root() -> Path:
    return bundled_sample_root()


def write_pair(folder: Path, stem: str, image: np.ndarray, mask: np.ndarray | Image.Image, ext: str = ".png") -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}{ext}")
    m = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8))
    m.save(folder / "masks" / f"{stem}.png")


def blob_image(rng: np.random.Generator, size=(48, 64), colour=(220, 40, 40), background=(40, 90, 200)):
    """A noisy background with one coloured ellipse; returns (image, binary mask)."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = background
    img[mask] = colour
    img += rng.normal(0, 12, img.shape)
    return img.clip(0, 255).astype(np.uint8), mask.astype(np.uint8)


@pytest.fixture
def blob_dataset(tmp_path: Path) -> Path:
    """<root>/blob/{images,masks}: 12 synthetic images of a red ellipse on blue, masks 0/255."""
    rng = np.random.default_rng(0)
    root = tmp_path / "blobs"
    for i in range(12):
        img, mask = blob_image(rng)
        write_pair(root / "blob", f"b{i:02d}", img, mask * 255)
    return root



def cluttered_blob_image(rng: np.random.Generator, size=(48, 64)):
    """A red-ish ellipse (labelled) of varying colour on a varying background, with an unlabelled
    look-alike ellipse beside it: hard enough that prompts and backend options change the mIoU."""
    h, w = size
    img, mask = blob_image(rng, size, colour=tuple(int(c) for c in rng.integers(150, 250, 3) * np.array([1, .3, .3])),
                           background=tuple(int(c) for c in rng.integers(30, 160, 3)))
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    decoy = ((((yy - cy) / (0.12 * h)) ** 2 + ((xx - cx) / (0.12 * w)) ** 2) <= 1) & (mask == 0)
    img = img.astype(np.float32)
    img[decoy] = rng.integers(120, 240, 3) * np.array([1, .5, .5]) + rng.normal(0, 20, (int(decoy.sum()), 3))
    return img.clip(0, 255).astype(np.uint8), mask


@pytest.fixture
def cluttered_dataset(tmp_path: Path) -> Path:
    """<root>/blob/{images,masks}: 12 cluttered synthetic images (see :func:`cluttered_blob_image`), masks 0/255."""
    rng = np.random.default_rng(0)
    root = tmp_path / "cluttered"
    for i in range(12):
        img, mask = cluttered_blob_image(rng)
        write_pair(root / "blob", f"b{i:02d}", img, mask * 255)
    return root

# --- a throw-away PostgreSQL server (tests marked ``postgres``) ------------------------------------------------
REQUIRE_POSTGRES = os.environ.get("PROMPTOPT_REQUIRE_POSTGRES") == "1"  # set by .ci/run: a missing server fails


def _postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else the newest /usr/lib/postgresql/<version>/bin (Debian)."""
    import shutil

    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


class PostgresServer:
    """A cluster in a temporary folder, listening on 127.0.0.1 only, password authentication (scram).

    initdb refuses to run as root: as root, the cluster belongs to the ``postgres`` user (which the Debian
    package creates) and its commands run as that user.
    """

    user, password = "promptopt", "pw-for-tests"

    def __init__(self) -> None:
        import pwd
        import socket
        import subprocess
        import tempfile

        self.bindir = _postgres_bindir()
        if self.bindir is None:
            raise RuntimeError("initdb/pg_ctl not found (install the postgresql package: apt-get install postgresql)")
        self.owner = None
        if os.geteuid() == 0:
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to own the cluster") from None
        self.root = Path(tempfile.mkdtemp(prefix="promptopt-pg-"))
        if self.owner:
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        (self.root / "pw").write_text(self.password + "\n")
        if self.owner:
            os.chown(self.root / "pw", self.owner.pw_uid, self.owner.pw_gid)
        self._run("initdb", "-D", str(self.root / "data"), "-U", self.user, f"--pwfile={self.root / 'pw'}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-locale")
        for _ in range(3):  # a port taken between choosing it and starting: choose again
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
            try:
                self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w", "-t", "60",
                          "-o", opts, "start")
                break
            except subprocess.CalledProcessError:
                continue
        else:
            log = (self.root / "log").read_text()[-500:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {log}")
        self._dbs = 0

    def _run(self, tool: str, *args: str) -> None:
        import subprocess

        kw = {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []} if self.owner else {}
        subprocess.run([str(self.bindir / tool), *args], check=True, capture_output=True, text=True, timeout=120,
                       cwd=self.root, **kw)

    def url(self, db: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{self.user}:{password or self.password}@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._dbs += 1
        name = f"test_{self._dbs}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        import shutil
        import subprocess

        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the session, stopped and deleted at the end; skipped (failed when
    PROMPTOPT_REQUIRE_POSTGRES=1) when it cannot be started here."""
    try:
        import psycopg  # noqa: F401  (the driver of promptopt[distributed])

        server = PostgresServer()
    except Exception as exc:  # no binaries, no postgres user, no driver, a server that does not start
        text = str(exc).strip()
        why = f"cannot start a local PostgreSQL server: {text.splitlines()[0] if text else type(exc).__name__}"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{why} (PROMPTOPT_REQUIRE_POSTGRES=1)", pytrace=False)
        pytest.skip(why)
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of a fresh database on the session's PostgreSQL server."""
    return postgres_server.new_database()


@pytest.fixture(params=["journal", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def study_storage(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, --storage value): each storage a search can live in — a journal file, an SQLite file, a
    PostgreSQL database on the throw-away server."""
    if request.param == "journal":
        return "journal", str(tmp_path / "study.log")
    if request.param == "sqlite":
        return "sqlite", f"sqlite:///{tmp_path / 'study.db'}"
    return "postgresql", request.getfixturevalue("postgres_url")
