"""``fastkd bench peers``: the message and exit status without the official code, and the whole path
(import from a checkout, weight copy, first-step loss check, alternating timing, profile, report) on
a small stand-in MoCo v3 checkout written here: the official interface (``moco/builder.py``
``MoCo_ViT`` / ``concat_all_gather``, ``vits.py`` ``VisionTransformerMoCo``) in a few lines. With the
real checkouts in ``$FASTKD_PEER_DIR`` (default ``/work/peers``) the quick run is also checked
against them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastkd.benchmarks import bench_peers

BUILDER = '''
import torch
import torch.nn as nn


class MoCo(nn.Module):
    def __init__(self, base_encoder, dim=256, mlp_dim=4096, T=1.0):
        super().__init__()
        self.T = T
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        hidden = self.base_encoder.head.weight.shape[1]
        self.base_encoder.head = self._build_mlp(3, hidden, mlp_dim, dim)
        self.momentum_encoder.head = self._build_mlp(3, hidden, mlp_dim, dim)
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim)
        for b, m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            m.data.copy_(b.data)
            m.requires_grad = False

    def _build_mlp(self, num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
        mlp = []
        for l in range(num_layers):
            dim1, dim2 = input_dim if l == 0 else mlp_dim, output_dim if l == num_layers - 1 else mlp_dim
            mlp.append(nn.Linear(dim1, dim2, bias=False))
            if l < num_layers - 1:
                mlp += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
            elif last_bn:
                mlp.append(nn.BatchNorm1d(dim2, affine=False))
        return nn.Sequential(*mlp)

    def forward(self, x1, x2, m):
        q1, q2 = self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            for b, p in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
                p.data = p.data * m + b.data * (1. - m)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class MoCo_ViT(MoCo):
    pass


def concat_all_gather(tensor):
    return tensor
'''

VITS = '''
from timm.models.vision_transformer import VisionTransformer


class VisionTransformerMoCo(VisionTransformer):
    def __init__(self, stop_grad_conv1=False, **kwargs):
        super().__init__(**kwargs)
        self.pos_embed.requires_grad = False
        if stop_grad_conv1:
            self.patch_embed.requires_grad_(False)
'''


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KINETO_LOG_LEVEL": "6"}
    return subprocess.run([sys.executable, "-m", "fastkd.cli", "bench", "peers", *argv], capture_output=True,
                          text=True, timeout=600, env=env)


def test_missing_official_code_says_how_to_get_it(tmp_path, capsys):
    status = bench_peers.main(["--peer-dir", str(tmp_path / "peers"), "--quick", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status != 0
    assert f"git clone https://github.com/facebookresearch/moco-v3 {tmp_path / 'peers' / 'moco-v3'}" in err
    assert f"git clone https://github.com/skyoux/mokd {tmp_path / 'peers' / 'mokd'}" in err
    assert not (tmp_path / "out").exists()
    # only the checkouts the chosen cases need are asked for; no folder at all names DIR
    assert bench_peers.main(["--cases", "mokd_vit_vit", "--quick", "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "git clone https://github.com/skyoux/mokd DIR/mokd" in err and "facebookresearch/moco-v3" not in err


def test_quick_run_against_a_stand_in_checkout(tmp_path):
    root = tmp_path / "moco-v3"
    (root / "moco").mkdir(parents=True)
    (root / "moco" / "__init__.py").write_text("")
    (root / "moco" / "builder.py").write_text(textwrap.dedent(BUILDER))
    (root / "vits.py").write_text(textwrap.dedent(VITS))
    out = tmp_path / "out"
    proc = _run("--mocov3-dir", str(root), "--cases", "mocov3_vit", "--quick", "--runs", "2", "--compiled",
                "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mocov3_vit: first-step losses fastkd" in proc.stdout
    payload = json.loads((out / "bench_peers.json").read_text())
    assert payload["machine"]["cpu"] and payload["machine"]["load_average_at_start"]
    (record,) = payload["records"]
    assert record["case"] == "mocov3_vit" and record["run"] in (1, 2) and len(record["ratio_runs"]) == 2
    assert record["official_loss"] == pytest.approx(record["fastkd_loss"], rel=bench_peers.LOSS_RTOL)
    assert record["ratio"] == pytest.approx(record["official_ms"] / record["fastkd_ms"])
    assert round(record["ratio"], 3) == min(record["ratio_runs"])  # the lower run is published
    assert record["ratio_compiled"] == pytest.approx(record["official_ms"] / record["fastkd_compiled_ms"])
    assert record["compile_s"] > 0 and "fastkd_compiled" in proc.stdout  # its first-step loss was checked too
    assert record["top_ops"]["fastkd"] and record["top_ops"]["official"]
    report = (out / "bench_peers.md").read_text()
    assert "| mocov3_vit |" in report and "Top ops" in report and "CPU:" in report


def test_a_broken_weight_copy_fails_the_loss_check(tmp_path):
    """A stand-in whose forward differs from fastkd's (a scaled loss) must fail, not be timed."""
    root = tmp_path / "moco-v3"
    (root / "moco").mkdir(parents=True)
    (root / "moco" / "__init__.py").write_text("")
    (root / "moco" / "builder.py").write_text(textwrap.dedent(BUILDER).replace("return self.contrastive_loss(q1, k2) +",
                                                                                "return 1.5 * self.contrastive_loss(q1, k2) +"))
    (root / "vits.py").write_text(textwrap.dedent(VITS))
    proc = _run("--mocov3-dir", str(root), "--cases", "mocov3_vit", "--quick", "--out", str(tmp_path / "out"))
    assert proc.returncode != 0 and "first-step losses differ" in proc.stderr


PEER_DIR = Path(os.environ.get("FASTKD_PEER_DIR", "/work/peers"))


@pytest.mark.skipif(bench_peers.missing_peers({"mocov3": PEER_DIR / "moco-v3", "mokd": PEER_DIR / "mokd"},
                                              {"mocov3", "mokd"}) is not None,
                    reason=f"the official moco-v3 / mokd checkouts are not in {PEER_DIR} ($FASTKD_PEER_DIR)")
def test_quick_run_against_the_official_code(tmp_path):
    proc = _run("--peer-dir", str(PEER_DIR), "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "bench_peers.json").read_text())["records"]
    assert [r["case"] for r in records] == list(bench_peers.CASES)
