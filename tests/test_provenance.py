"""Provenance end to end, through real worker processes on both backends: every picture carries
a signed C2PA manifest (read back with c2pa's own Reader), a variation names its source as an
ingredient, the requester is credited only after ``/settings credit on``, the watermark's job
id survives JPEG recompression, ``musespark verify`` says so with its exit code, and a worker
without a usable signing key refuses to start."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import c2pa
import pytest
from PIL import Image

from bots.console import ConsoleChat, ShownMessage
from core.events import Actor
from tests._stack import REPO, Stack
from tests.conftest import BACKENDS, _require_backend
from workers.provenance import create_local_chain

RESULT_TIMEOUT_SECONDS = 240
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


@pytest.fixture(scope="module", params=BACKENDS)
def prov_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               model_cache: Path) -> Iterator[Stack]:
    """One deployment per backend whose demo pictures are big enough for the watermark."""
    _require_backend(request.param)
    stack = Stack.create(request.param, tmp_path_factory.mktemp(f"prov-{request.param}"),
                         model_cache, MUSESPARK_IMAGE_SIZE="272", MUSESPARK_IMAGE_TAKES="1")
    try:
        stack.start_worker()
        yield stack
    finally:
        stack.close()


def _env(stack: Stack, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
    env.update(stack.env, **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _verify_cli(stack: Stack, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bots.cli", "verify", str(path)],
                          env=_env(stack), cwd=stack.root, capture_output=True, text=True,
                          timeout=120)


def _result(chat: ConsoleChat, stack: Stack, text: str) -> ShownMessage:
    (status,) = [m for m in chat.say(text) if m.kind == "status"]
    shown = chat.wait(lambda ms: any(m.job_id == status.job_id and m.kind in ("result", "error")
                                     for m in ms), timeout=RESULT_TIMEOUT_SECONDS)
    (result,) = [m for m in shown if m.job_id == status.job_id and m.kind in ("result", "error")]
    assert result.kind == "result", (result.text, stack.job(status.job_id).failure_reason)
    return result


def _manifest(stack: Stack, path: str) -> tuple[str, dict]:
    """c2pa's own verdict and active manifest, trusting the deployment's root only."""
    anchors = (stack.settings.trust_dir / "trust-anchors.pem").read_text()
    context = c2pa.Context.from_dict({"trust": {"trust_anchors": anchors},
                                      "verify": {"remote_manifest_fetch": False}})
    with open(path, "rb") as data, c2pa.Reader("image/png", data, None, context) as reader:
        return reader.get_validation_state(), reader.get_active_manifest()


def _assertion(manifest: dict, label: str) -> dict | None:
    found = [a["data"] for a in manifest["assertions"] if a["label"] == label]
    return found[0] if found else None


def test_pictures_are_signed_credited_on_request_and_variations_name_their_source(
        prov_stack: Stack) -> None:
    stack = prov_stack
    chat = stack.chat()
    chat.user = Actor("ada", "Ada Lovelace")
    first = _result(chat, stack, "/imagine a red fox in the snow --seed 5")
    job = stack.job(first.job_id)  # type: ignore[arg-type]
    state, manifest = _manifest(stack, first.images[0])
    assert state == "Trusted"
    assert [g["name"] for g in manifest["claim_generator_info"]] == ["MuseSpark"]
    (created,) = _assertion(manifest, "c2pa.actions.v2")["actions"]  # type: ignore[index]
    assert created["action"] == "c2pa.created" and created["digitalSourceType"] == TRAINED
    assert created["parameters"] == {"job_id": job.id, "model": job.model, "seed": job.seed}
    assert _assertion(manifest, "stds.schema-org.CreativeWork") is None, "no one named by default"
    with Image.open(first.images[0]) as picture:
        recipe = json.loads(picture.text["musespark"])  # type: ignore[attr-defined]
    assert recipe["provenance"]["watermark"].startswith("dwtDctSvd watermark")
    assert recipe["provenance"]["credited"] is False

    # Credit is asked for, and the next picture (a variation of the first) names its source.
    assert "name you" in chat.say("/settings credit on")[0].text
    variation = _result(chat, stack, f"/press {first.id} vary1")
    state, manifest = _manifest(stack, variation.images[0])
    assert state == "Trusted"
    work = _assertion(manifest, "stds.schema-org.CreativeWork")
    assert work is not None and work["author"] == [{"@type": "Person", "name": "Ada Lovelace"}]
    (ingredient,) = manifest["ingredients"]
    assert ingredient["title"] == "1.png" and ingredient["relationship"] == "inputTo"
    assert ingredient.get("active_manifest"), "the source's own manifest travels with it"
    assert "no longer name you" in chat.say("/settings credit off")[0].text
    assert stack.runtime.store.credit_name(job.user_id) is None

    # Telegram-like recompression drops the manifest; the watermark still names the job.
    recompressed = stack.root / "recompressed.jpg"
    with Image.open(first.images[0]) as picture:
        picture.convert("RGB").save(recompressed, format="JPEG", quality=80)
    result = _verify_cli(stack, recompressed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"job: {job.id}" in result.stdout
    assert f"Invisible watermark: job {job.id}" in result.stdout
    assert "C2PA manifest: none" in result.stdout
    assert "Ada" not in result.stdout, "not credited when that picture was made, nor now"

    original = _verify_cli(stack, Path(variation.images[0]))
    assert original.returncode == 0 and "trusted" in original.stdout, original.stdout
    assert "Creator: Ada Lovelace" in original.stdout


def test_verify_says_when_there_is_nothing_to_find(prov_stack: Stack,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The exit codes of ``musespark verify`` (its module's ``main``, in this process)."""
    from workers.provenance.__main__ import main as verify

    stack = prov_stack
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    plain = stack.root / "holiday.png"
    Image.effect_noise((400, 300), 40).convert("RGB").save(plain)
    assert verify(["verify", str(plain)]) == 1
    assert "No MuseSpark provenance found in holiday.png" in capsys.readouterr().out
    notes = stack.root / "notes.png"
    notes.write_text("not a picture")
    assert verify(["verify", str(notes)]) == 2
    assert "not a picture I can read" in capsys.readouterr().err
    assert verify(["verify", str(stack.root / "missing.png")]) == 2
    assert "Cannot read" in capsys.readouterr().err


def _start_worker(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers", "--concurrency", "1"], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_worker_without_a_usable_signing_key_refuses_to_start(tmp_path: Path,
                                                                model_cache: Path) -> None:
    stack = Stack.create("embedded", tmp_path / "stack", model_cache)
    missing = _start_worker(_env(stack, MUSESPARK_SIGNING_CERT=str(tmp_path / "chain.pem"),
                                 MUSESPARK_SIGNING_KEY=str(tmp_path / "key.pem")), tmp_path)
    assert missing.returncode == 3, missing.stderr[-2000:]
    assert f"cannot sign pictures: The signing certificate chain {tmp_path / 'chain.pem'} " \
           "does not exist" in missing.stderr
    # The local chain, with its key swapped for another: a mismatch, said as such.
    made = subprocess.run([sys.executable, "-m", "bots.cli", "trust", "init"], env=_env(stack),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    trust = stack.settings.trust_dir
    assert (trust / "signing.key").stat().st_mode & 0o777 == 0o600
    other = tmp_path / "other"
    create_local_chain(other / "trust")
    (trust / "signing.key").write_bytes((other / "trust" / "signing.key").read_bytes())
    # The worker's start-up check (check_signing) in this process, for the cheaper cases.
    from core.settings import Settings
    from workers.provenance import TrustError, check_signing

    with pytest.raises(TrustError, match="does not belong to the first certificate"):
        check_signing(Settings(_env_file=None, data_dir=stack.root / "data"))  # type: ignore[call-arg]
    # Only half of an operator's chain configured.
    with pytest.raises(TrustError, match="Set both MUSESPARK_SIGNING_CERT"):
        check_signing(Settings(_env_file=None, data_dir=stack.root / "data",  # type: ignore[call-arg]
                               signing_cert=trust / "signing-chain.pem"))
    # A self-signed signing certificate (no CA): c2pa refuses it, and so does the worker.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificates((trust / "signing-chain.pem").read_bytes())[0]
    key = serialization.load_pem_private_key(
        (other / "trust" / "signing.key").read_bytes(), password=None)
    self_signed = tmp_path / "self-signed.pem"
    self_signed.write_bytes(x509.CertificateBuilder().subject_name(leaf.subject)
                            .issuer_name(leaf.subject).public_key(key.public_key())
                            .serial_number(1).not_valid_before(leaf.not_valid_before_utc)
                            .not_valid_after(leaf.not_valid_after_utc)
                            .sign(key, leaf.signature_hash_algorithm)  # type: ignore[arg-type]
                            .public_bytes(serialization.Encoding.PEM))
    refused = _start_worker(_env(stack, MUSESPARK_SIGNING_CERT=str(self_signed),
                                 MUSESPARK_SIGNING_KEY=str(other / "trust" / "signing.key")),
                            tmp_path)
    assert refused.returncode == 3 and "c2pa refused the signing chain" in refused.stderr
    for result in (missing, refused):
        assert "PRIVATE KEY" not in result.stderr + result.stdout, "keys are never logged"


def test_trust_init_keeps_an_existing_chain_and_force_keeps_the_old_root_trusted(
        tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``musespark trust init`` (its module's ``main``, in this process; the command itself
    runs in the test above)."""
    from workers.provenance.__main__ import main as provenance

    stack = Stack.create("embedded", tmp_path / "stack", model_cache)
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    assert provenance(["trust", "init"]) == 0
    assert "Made a local root CA" in capsys.readouterr().out
    trust = stack.settings.trust_dir
    key = (trust / "signing.key").read_bytes()
    assert provenance(["trust", "init"]) == 0
    assert "already exists" in capsys.readouterr().out
    assert (trust / "signing.key").read_bytes() == key
    assert provenance(["trust", "init", "--force"]) == 0
    assert (trust / "signing.key").read_bytes() != key
    assert (trust / "trust-anchors.pem").read_text().count("BEGIN CERTIFICATE") == 2
    assert trust.stat().st_mode & 0o777 == 0o700
