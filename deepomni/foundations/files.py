"""A foundation set on disk: writing it (bf16 safetensors + sha256), finding and verifying a shipped one.

    <set>/encoder/config.json          WhisperConfig (a local Whisper directory: speech_encoder.path)
    <set>/encoder/model.safetensors    encoder.* in bf16
    <set>/encoder/ctc_head.safetensors, ctc_vocab.json   the CTC head it was pretrained with (transcribes, and
                                       cuts speech into one position per character: positions "ctc")
    <set>/base/config.json             ModelConfig; speech_encoder.path "../encoder" (relative to base/)
    <set>/base/model.safetensors       every tensor but speech.encoder.* and speech.projector.*, in bf16: a checkpoint
                                       ``deepomni.checkpoint.load_model`` (``--init``) reads as it is
    <set>/manifest.json                how it was made, sha256 of every file, the figures
    <set>/{encoder,base}/manifest.json the same for the part's own files, beside its weights
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import PROJECTOR
from ..weights import read_tensors, weight_map

SHIPPED = Path(__file__).resolve().parent  # deepomni/foundations/<name>/
DEFAULT = "small"  # the set `deepomni pipeline` (make demo) starts from
MANIFEST = "manifest.json"
PARTS = ("encoder", "base")


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def export_set(encoder_dir: Path, base_checkpoint: Path, out: Path) -> None:
    """Write ``out/encoder`` and ``out/base`` from a pretrained encoder directory and a base checkpoint."""
    enc_out, base_out = out / "encoder", out / "base"
    for d in (enc_out, base_out):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    shutil.copy2(encoder_dir / "config.json", enc_out / "config.json")
    shutil.copy2(encoder_dir / "ctc_vocab.json", enc_out / "ctc_vocab.json")
    for name in ("model.safetensors", "ctc_head.safetensors"):
        save_file(_bf16(load_file(str(encoder_dir / name))), str(enc_out / name), metadata={"format": "pt"})
    cfg = json.loads((base_checkpoint / "config.json").read_text())
    cfg["speech_encoder"]["path"] = "../encoder"
    # the encoder was CTC-pretrained on windows cut to each batch's utterances (EncoderPretrainConfig.
    # crop_to_batch): it reads each utterance's own frames, not a padded 8 s window
    cfg["speech_encoder"]["window"] = "utterance"
    # ... and has its CTC head: the backbone reads one position per character heard (model.speech)
    cfg["speech_encoder"]["positions"] = "ctc"
    (base_out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    # a base LLM has no projector: the first stage that gives it speech starts one (Stage.projector_from_text)
    files = weight_map(base_checkpoint)
    state = dict(read_tensors(files, [k for k in files if not k.startswith(("speech.encoder.", PROJECTOR))]))
    save_file(_bf16(state), str(base_out / "model.safetensors"), metadata={"format": "deepomni"})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(root: Path) -> dict[str, dict]:
    """``relative path -> {"sha256", "bytes"}`` of every file under ``root`` but the manifest."""
    return {str(p.relative_to(root)): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def locate(name_or_dir: str) -> Path:
    """A shipped set by name (``small``) or a directory holding ``manifest.json``."""
    for d in (Path(name_or_dir), SHIPPED / name_or_dir):
        if (d / MANIFEST).is_file():
            return d.resolve()
    shipped = sorted(p.parent.name for p in SHIPPED.glob("*/manifest.json"))
    raise FileNotFoundError(f"no foundation set {name_or_dir!r}: not a directory with manifest.json, nor a shipped "
                            f"set ({', '.join(shipped) or 'none shipped'})")


def manifest(name_or_dir: str) -> dict:
    return json.loads((locate(name_or_dir) / MANIFEST).read_text())


def verify(name_or_dir: str) -> list[str]:
    """The problems of a set against its manifest (missing files, wrong sha256); empty when it is intact."""
    root = locate(name_or_dir)
    listed = manifest(name_or_dir)["files"]
    problems = []
    for rel, meta in listed.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256(p) != meta["sha256"]:
            problems.append(f"{rel}: sha256 {sha256(p)[:12]}... is not the manifest's {meta['sha256'][:12]}...")
    return problems


def encoder_dir(name_or_dir: str) -> Path:
    return locate(name_or_dir) / "encoder"


def base_dir(name_or_dir: str) -> Path:
    return locate(name_or_dir) / "base"
