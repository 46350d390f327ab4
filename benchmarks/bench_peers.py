"""fastkd against the official code: one training step (forward + backward + optimiser step + EMA
update) of fastkd's method and of the official implementation in one process, same shapes, weights, fp32.

Cases (``--cases``):

- ``mocov3_vit``: the official MoCo v3 (github.com/facebookresearch/moco-v3: ``moco/builder.py``
  ``MoCo_ViT`` over ``vits.py``'s ``VisionTransformerMoCo``, ``vit_small`` settings; ``main_moco.py``'s
  step: AdamW, momentum update inside the forward) vs fastkd's ``mocov3``;
- ``mokd_vit_vit`` / ``mokd_r18_vit``: the official MOKD (github.com/skyoux/mokd: ``models/mokd.py``,
  ``backbones/``; ``main_mokd.py``'s ``train_one_epoch`` step: both losses, per-parameter clipping at
  3, last layer cancelled in epoch 0, SGD for model a and AdamW for the ViT, each EMA teacher moved
  after its optimiser) vs fastkd's ``mokd`` as ``configs/demo/mokd.yaml`` / ``configs/mokd_r18_vits.yaml``
  configure it (same-width ViTs in the ViT-ViT case: the official T-head has no adapter).

``--peer-dir DIR`` holds the checkouts ``DIR/moco-v3`` and ``DIR/mokd`` (or ``--mocov3-dir`` /
``--mokd-dir``), imported unchanged with shims for today's timm / torchvision; a one-rank gloo group
serves their ``torch.distributed`` calls. Drop path 0 on both sides. The official state is copied into
fastkd's (names mapped, shapes checked, every parameter covered) and both first-step losses must agree
to ``LOSS_RTOL``. ``ratio`` = official median / fastkd median (alternating rounds; higher: fastkd
faster); ``--runs N`` (default 2) publishes each case from its run with the lowest ratio (``run``,
every run's in ``ratio_runs``). The Markdown lists each side's top ops by self CPU time.

    fastkd bench peers --peer-dir DIR [--quick] [--runs 2] [--cases mocov3_vit ...] [--out DIR]
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import sys
import tempfile
import time
import types
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import (image_batch, lowest_of_runs, machine_line, profile_top_ops, time_alternating,
                                      trainer_step)
from fastkd.config import load_config
from fastkd.configs import demo_config_dir
from fastkd.methods import build_method
from fastkd.reporting import load_average, markdown_table, write_results

CASES = ("mocov3_vit", "mokd_vit_vit", "mokd_r18_vit")
PEERS = {"mocov3": ("moco-v3", "https://github.com/facebookresearch/moco-v3", ("moco/builder.py", "vits.py")),
         "mokd": ("mokd", "https://github.com/skyoux/mokd",
                  ("models/mokd.py", "backbones/vision_transformer.py", "backbones/resnet.py", "utils/utils.py"))}
LOSS_RTOL = 1e-5
CLIP = 3.0  # the official README's --clip_grad_cnn 3 --clip_grad_vit 3
VIT = dict(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))  # vit_small's other settings
# shapes: vit = (img, patch, dim, depth, heads); moco heads; mokd: model a (vit tuple or "resnet18"), b, heads, crops
SHAPES = {
    True: {"mocov3": dict(vit=(32, 8, 96, 4, 3), hidden=256, out=64, batch=8),
           "mokd": dict(a=(2, 3), b=(4, 3), dim=96, patch=8, global_size=32, local_size=16, local_crops=2,
                        out=256, hidden=128, bottleneck=32, thead=(1, 3), batch=8)},
    False: {"mocov3": dict(vit=(64, 16, 384, 12, 12), hidden=4096, out=256, batch=16),
            "mokd": dict(a=(6, 6), b=(12, 6), dim=384, patch=16, global_size=64, local_size=32, local_crops=4,
                         out=4096, hidden=2048, bottleneck=256, thead=(3, 6), batch=8)},
}
MOKD_R18 = dict(global_size=64, local_size=32, patch=16)  # both sizes: a ResNet-18 needs 64 px


def missing_peers(dirs: dict[str, Path | None], needed: set[str]) -> str | None:
    """None when every needed checkout holds its files, else how to get them."""
    lines = []
    for key in sorted(needed):
        folder, url, files = PEERS[key]
        root = dirs[key]
        if root is None or not all((root / f).is_file() for f in files):
            lines.append(f"  git clone {url} {root if root is not None else Path('DIR') / folder}")
    if not lines:
        return None
    return ("fastkd bench peers needs the official code, which fastkd does not ship. Get it with\n" + "\n".join(lines)
            + "\nand run with --peer-dir DIR (the folder holding moco-v3/ and mokd/) or --mocov3-dir / --mokd-dir.")


@contextlib.contextmanager
def _shims():
    """The modules today's timm / torchvision lack, in ``sys.modules`` meanwhile."""
    import timm.layers
    import torchvision.models.resnet as tv_resnet

    resnet = types.ModuleType(tv_resnet.__name__)
    resnet.__dict__.update({k: v for k, v in vars(tv_resnet).items() if not k.startswith("__")})
    resnet.model_urls = getattr(tv_resnet, "model_urls", {})
    shims = {tv_resnet.__name__: resnet}
    try:
        importlib.import_module("timm.models.layers.helpers")
    except ImportError:
        shims["timm.models.layers.helpers"] = types.ModuleType("timm.models.layers.helpers")
        shims["timm.models.layers.helpers"].to_2tuple = timm.layers.to_2tuple
    saved = {name: sys.modules.get(name) for name in shims}
    sys.modules.update(shims)
    try:
        yield
    finally:
        sys.modules.update({name: module for name, module in saved.items() if module is not None})
        for name in (name for name, module in saved.items() if module is None):
            sys.modules.pop(name, None)


def load_peer(root: Path, names: list[str]) -> dict[str, types.ModuleType]:
    """The modules ``names`` of the checkout ``root``, whose modules then leave ``sys.modules``."""
    root = Path(root).resolve()
    sys.path.insert(0, str(root))
    try:
        with _shims(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(root))
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(root)):
                del sys.modules[name]


def process_group() -> None:
    """A one-rank gloo group for the official code's ``torch.distributed`` calls."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def copy_state(source: nn.Module, target: nn.Module, rules: list[tuple[str, str]]) -> int:
    """Copy ``source``'s state into ``target``, each key renamed by its first matching ``(source
    prefix, target prefix)`` rule, equal sizes reshaped (a 1x1 conv into a linear); ``KeyError`` for a
    mismatch or an uncovered target parameter under a rule's prefix. Returns the tensors copied."""
    target_state, covered, unmatched = target.state_dict(), set(), []
    with torch.no_grad():
        for key, value in source.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            rule = next(((a, b) for a, b in rules if key.startswith(a)), None)
            name = None if rule is None else rule[1] + key[len(rule[0]):]
            if name not in target_state or target_state[name].numel() != value.numel():
                shape = tuple(target_state[name].shape) if name in target_state else "missing"
                unmatched.append(f"official {key} {tuple(value.shape)} -> fastkd {name} {shape}")
                continue
            target_state[name].copy_(value.reshape(target_state[name].shape))
            covered.add(name)
    prefixes = tuple(b for _, b in rules)
    unmatched += [f"fastkd {n}: no official counterpart" for n, _ in target.named_parameters()
                  if n.startswith(prefixes) and n not in covered]
    if unmatched:
        raise KeyError(f"official and fastkd state differ: {unmatched[:5]}")
    return len(covered)


def _views(sizes: list[int], batch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, s, s, generator=generator) for s in sizes]


def mocov3_case(root: Path, quick: bool, workdir: Path, **train):
    """``(fastkd step, official step)`` of MoCo v3 (``train``: the fastkd side's ``TrainConfig`` overrides)."""
    builder, vits = load_peer(root, ["moco.builder", "vits"]).values()
    s = SHAPES[quick]["mocov3"]
    img, patch, dim, depth, heads = s["vit"]
    if not hasattr(vits.VisionTransformerMoCo, "num_tokens"):  # timm >= 0.9 calls it num_prefix_tokens
        vits.VisionTransformerMoCo.num_tokens = property(lambda self: self.num_prefix_tokens)

    class MoCoViT(builder.MoCo_ViT):
        def contrastive_loss(self, q, k):  # the official loss at world size 1, labels on q's device
            q, k = nn.functional.normalize(q, dim=1), nn.functional.normalize(k, dim=1)
            logits = torch.einsum("nc,mc->nm", [q, builder.concat_all_gather(k)]) / self.T
            labels = torch.arange(logits.shape[0], dtype=torch.long) + logits.shape[0] * dist.get_rank()
            return nn.CrossEntropyLoss()(logits, labels.to(q.device)) * (2 * self.T)

    process_group()
    torch.manual_seed(0)
    encoder = partial(vits.VisionTransformerMoCo, img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                      num_heads=heads, stop_grad_conv1=True, **VIT)
    official = MoCoViT(encoder, dim=s["out"], mlp_dim=s["hidden"], T=0.2).train()
    run = load_config(demo_config_dir() / "mocov3.yaml", [])
    config = {**run.method_config, "proj_hidden_dim": s["hidden"], "pred_hidden_dim": s["hidden"], "out_dim": s["out"],
              "backbone": {"arch": "vit_small_patch16_224",
                           "kwargs": dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)}}
    method = build_method("mocov3", config).train()
    copy_state(official, method, [("base_encoder.head.", "base_encoder.1.mlp."), ("base_encoder.", "base_encoder.0.model."),
                                  ("momentum_encoder.head.", "momentum_encoder.module.1.mlp."),
                                  ("momentum_encoder.", "momentum_encoder.module.0.model."), ("predictor.", "predictor.mlp.")])
    x1, x2 = _views([img, img], s["batch"])
    optimizer = torch.optim.AdamW(official.parameters(), run.optim.lr, weight_decay=run.optim.weight_decay)

    def official_step():  # main_moco.py train(), fp32 (no autocast / scaler)
        loss = official(x1, x2, 0.99)
        loss.item()  # losses.update(loss.item(), ...)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    return trainer_step(method, image_batch([x1, x2]), workdir, optim=run.optim, **train), official_step


def mokd_case(root: Path, quick: bool, workdir: Path, cnn: bool, **train):
    """``(fastkd step, official step)`` of MOKD, model a a ResNet-18 (``cnn``) or a ViT, model b a ViT."""
    mokd, vits, resnets, utils = load_peer(
        root, ["models.mokd", "backbones.vision_transformer", "backbones.resnet", "utils.utils"]).values()
    s = {**SHAPES[quick]["mokd"], **(MOKD_R18 if cnn else {})}
    G, L, D = s["global_size"], s["local_size"], s["dim"]
    grid = G // s["patch"]
    thead = dict(out_dim=s["out"], embed_dim=D, depth=s["thead"][0], num_heads=s["thead"][1], **VIT)
    head = dict(hidden_dim=s["hidden"], bottleneck_dim=s["bottleneck"])
    process_group()
    torch.manual_seed(0)

    def vit(depth, heads):
        return vits.VisionTransformer(img_size=[G], patch_size=s["patch"], embed_dim=D, depth=depth, num_heads=heads,
                                      drop_path_rate=0.0, **VIT)

    def pair(x):  # (student, teacher) wrappers of model x, as main_mokd.py builds them
        resnet = x == "a" and cnn
        backbones = [resnets.resnet18() if resnet else vit(*s[x]) for _ in range(2)]
        width = backbones[0].fc.weight.shape[1] if resnet else D
        heads_ = [vits.THead_CNN(featuremap_size=G // 32, in_chans=width, **thead) if resnet
                  else vits.THead_ViT(featuremap_size=grid, **thead) for _ in range(2)]
        student, teacher = ((mokd.CNNStudentWrapper, mokd.CNNTeacherWrapper) if resnet
                            else (mokd.ViTStudentWrapper, mokd.ViTTeacherWrapper))
        return (student(backbones[0], mokd.DINOHead(width, s["out"], norm_last_layer=x == "a", **head), heads_[0]),
                teacher(backbones[1], mokd.DINOHead(width, s["out"], False, **head), heads_[1], s["local_crops"]))

    (student_a, teacher_a), (student_b, teacher_b) = pair("a"), pair("b")
    for student, teacher in ((student_a, teacher_a), (student_b, teacher_b)):
        teacher.load_state_dict(student.state_dict(), strict=False)
        teacher.requires_grad_(False)
    name = "mokd_r18_vits.yaml" if cnn else "demo/mokd.yaml"
    run = load_config(Path(demo_config_dir()).parent / name, [])
    vit_kwargs = lambda depth, heads: {"arch": "vit_small_patch16_224", "kwargs": dict(  # noqa: E731
        img_size=G, patch_size=s["patch"], embed_dim=D, depth=depth, num_heads=heads, dynamic_img_size=True)}
    config = {**run.method_config, "out_dim": s["out"], "dino_hidden_dim": s["hidden"],
              "bottleneck_dim": s["bottleneck"], "thead_dim": D, "thead_depth": s["thead"][0],
              "thead_heads": s["thead"][1], "thead_pos_embed": True,
              "models": {"a": {"arch": "resnet18"} if cnn else vit_kwargs(*s["a"]), "b": vit_kwargs(*s["b"])},
              **({"thead_pos_grid_a": G // 32} if cnn else {})}
    method = build_method("mokd", config).train()
    for x, student, teacher in (("a", student_a, teacher_a), ("b", student_b, teacher_b)):
        for official, prefix in ((student, f"branches.{x}."), (teacher, f"teachers.{x}.module.")):
            copy_state(official, method, [("backbone.", f"{prefix}backbone.model."), ("head.", f"{prefix}dino_head."),
                                          ("transhead.patch_embed.", f"{prefix}thead.adapter."),
                                          ("transhead.", f"{prefix}thead.")])
    clip = {"clip_grad": CLIP, "clip_mode": "per_param"}  # the official clip_gradients, both models
    optim = dataclasses.replace(run.optim, warmup_epochs=0.0, **clip,
                                per_model={k: {**v, **clip} for k, v in run.optim.per_model.items()})
    n = s["local_crops"] + 2
    losses = {k: mokd.DINOLoss(s["out"], n, 0.04, 0.07, 50 if k in ("a_m", "a_t") else 30, 100)
              for k in ("a_m", "b_m", "a_ct", "b_ct", "a_t", "b_t")}
    search = mokd.CTSearchLoss(0.04, 0.07, 30, 100)
    opt_a = torch.optim.SGD(utils.get_params_groups2(student_a, head_name="transhead"), lr=0, momentum=0.9)
    opt_b = torch.optim.AdamW(utils.get_params_groups(student_b))
    lam_a, lam_b = config.get("lambda_a", 1.0), config.get("lambda_b", 0.1)
    images = _views([G, G] + [L] * s["local_crops"], s["batch"])
    epoch, m = 0, 0.996

    def official_step():  # main_mokd.py train_one_epoch, one iteration, fp32 (no autocast / scalers)
        for i, group in enumerate(opt_a.param_groups):
            group["lr"] = 0.03 if i != 2 else 1e-3
            if i in (0, 2):
                group["weight_decay"] = 1e-4 if i == 0 else 0.04
        for i, group in enumerate(opt_b.param_groups):
            group["lr"] = 1e-3
            if i == 0:
                group["weight_decay"] = 0.04
        sa_m, sa_t_g, _ = student_a(images[:2])
        sa_m_l, sa_t_l, sa_out_l = student_a(images[2:])
        sa_m, sa_t = torch.cat([sa_m, sa_m_l]), torch.cat([sa_t_g, sa_t_l])
        sb_m, sb_t_g, _ = student_b(images[:2])
        sb_m_l, sb_t_l, sb_out_l = student_b(images[2:])
        sb_m, sb_t = torch.cat([sb_m, sb_m_l]), torch.cat([sb_t_g, sb_t_l])
        ta_m, ta_t, ta_search_l, _ = teacher_a(images[:2], local_token=sb_out_l.detach())
        tb_m, tb_t, tb_search_l, _ = teacher_b(images[:2], local_token=sa_out_l.detach())
        loss_a = (losses["a_m"](sa_m, ta_m, epoch) + losses["a_t"](sa_t, ta_t, epoch)
                  + lam_a * (losses["a_ct"](sa_m, tb_m.detach(), epoch) + search(sa_t_l, tb_search_l.detach(), epoch)))
        loss_b = (losses["b_m"](sb_m, tb_m, epoch) + losses["b_t"](sb_t, tb_t, epoch)
                  + lam_b * (losses["b_ct"](sb_m, ta_m.detach(), epoch) + search(sb_t_l, ta_search_l.detach(), epoch)))
        assert math.isfinite(loss_a.item()) and math.isfinite(loss_b.item()), "official MOKD step: non-finite loss"
        for student, teacher, optimizer, loss in ((student_a, teacher_a, opt_a, loss_a),
                                                  (student_b, teacher_b, opt_b, loss_b)):
            optimizer.zero_grad()
            loss.backward()
            utils.clip_gradients(student, CLIP)
            utils.cancel_gradients_last_layer(epoch, student, 1)
            optimizer.step()
            with torch.no_grad():
                for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                    param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return loss_a + loss_b

    return trainer_step(method, image_batch(images), workdir, optim=optim, **train), official_step


def bench_case(case: str, dirs: dict, quick: bool, rounds: int, repeats: int, workdir: Path,
               compiled: bool = False) -> dict:
    """One case's record; ``compiled`` adds fastkd with ``train.compile: true`` (built from the same weights, its
    first step, which compiles, timed as ``compile_s``) to the alternating rounds."""
    def build(**train):
        if case == "mocov3_vit":
            return mocov3_case(dirs["mocov3"], quick, workdir / "_".join(train), **train)
        return mokd_case(dirs["mokd"], quick, workdir / "_".join(train), cnn=case == "mokd_r18_vit", **train)

    sides = dict(zip(("fastkd", "official"), build()))
    if compiled:  # --quick checks the wiring on eager (seconds), the full run times inductor
        sides["fastkd_compiled"] = build(compile=True, **({"compile_backend": "eager"} if quick else {}))[0]
    first, compile_s = {}, None
    for side, step in sides.items():
        start = time.perf_counter()
        first[side] = float(step().detach())
        compile_s = time.perf_counter() - start if side == "fastkd_compiled" else compile_s
    print(f"{case}: first-step losses " + ", ".join(f"{side} {loss:.7f}" for side, loss in first.items()))
    for side in set(sides) - {"official"}:
        if not math.isclose(first[side], first["official"], rel_tol=LOSS_RTOL, abs_tol=LOSS_RTOL):
            raise AssertionError(f"{case}: first-step losses differ beyond {LOSS_RTOL}: {first}")
    ms = {side: t["median_ms"] for side, t in time_alternating(sides, rounds=rounds, repeats=repeats).items()}
    print(f"{case}: " + ", ".join(f"{side} {v:.1f} ms" for side, v in ms.items())
          + f", ratio {ms['official'] / ms['fastkd']:.3f}")
    record = {"case": case, "fastkd_ms": ms["fastkd"], "official_ms": ms["official"],
              "ratio": ms["official"] / ms["fastkd"],
              "fastkd_loss": first["fastkd"], "official_loss": first["official"], "repeats": repeats, "rounds": rounds,
              "top_ops": {"fastkd": profile_top_ops(sides["fastkd"]), "official": profile_top_ops(sides["official"])}}
    if compiled:
        record.update(fastkd_compiled_ms=ms["fastkd_compiled"], compile_s=compile_s,
                      ratio_compiled=ms["official"] / ms["fastkd_compiled"])
    return record


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "small shapes, one run, one round (<= 60 s on 2 cores)",
                          rounds_help="alternating timing rounds (default 2)",
                          runs_help="measure everything this many times, publish each case's lowest ratio (default 2)",
                          devices=("cpu",), device_help="fp32 CPU steps only")
    parser.set_defaults(runs=None)
    parser.add_argument("--peer-dir", type=Path, default=None, help="folder with the moco-v3/ and mokd/ checkouts")
    parser.add_argument("--mocov3-dir", type=Path, default=None, help="the moco-v3 checkout (default PEER_DIR/moco-v3)")
    parser.add_argument("--mokd-dir", type=Path, default=None, help="the mokd checkout (default PEER_DIR/mokd)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--compiled", action="store_true",
                        help="also time fastkd with train.compile: true (ratio_compiled; its compile time in compile_s; "
                             "--quick: on the eager backend)")
    args = parse_bench_args(parser, argv)
    dirs = {key: getattr(args, f"{key}_dir") or (args.peer_dir / folder if args.peer_dir else None)
            for key, (folder, _, _) in PEERS.items()}
    message = missing_peers(dirs, {"mocov3" if c.startswith("mocov3") else "mokd" for c in args.cases})
    if message:
        print(message, file=sys.stderr)
        return 2
    load = load_average()
    runs = args.runs or (1 if args.quick else 2)
    rounds = args.rounds or 2
    repeats = 3
    all_runs, grouped = [], dist.is_initialized()
    try:
        for number in range(1, runs + 1):
            with tempfile.TemporaryDirectory(prefix="fastkd-bench-peers-") as tmp:
                all_runs.append([{**bench_case(c, dirs, args.quick, rounds, repeats, Path(tmp) / c, args.compiled),
                                  "run": number} for c in args.cases])
    finally:
        if not grouped and dist.is_initialized():  # the group process_group() started
            dist.destroy_process_group()
    records = lowest_of_runs(all_runs, ("case",), "ratio")
    columns = ["case", "run", "fastkd_ms", "official_ms", "ratio", "fastkd_loss", "official_loss", "ratio_runs"]
    if args.compiled:
        columns[5:5] = ["fastkd_compiled_ms", "ratio_compiled", "compile_s"]
    rows = [{**r, **{k: f"{r[k]:.7f}" for k in ("fastkd_loss", "official_loss")}} for r in records]
    profiles = "\n\n".join(
        f"### {r['case']}, {side} (run {r['run']})\n\n" + markdown_table(r["top_ops"][side], ["op", "self_ms", "calls"])
        for r in records for side in ("fastkd", "official"))
    markdown = (
        f"## fastkd vs the official code, one training step (cpu, fp32, {torch.get_num_threads()} threads"
        f"{', quick shapes' if args.quick else ''})\n\n{machine_line(load)} {runs} run(s), {rounds} alternating "
        f"round(s) of {repeats} "
        f"steps; each case from its run with the lowest ratio.\n\n{markdown_table(rows, columns)}\n\n"
        "ratio = official median / fastkd median (higher: fastkd faster; fastkd as shipped: `train.compile: auto`, "
        "eager on CPU until this machine has recorded that compiling pays); ratio_compiled = official median / "
        "fastkd `train.compile: true` median, same rounds; losses: the first step's, same weights.\n\n"
        f"## Top ops by self CPU time (ms, one profiled step)\n\n{profiles}")
    write_results("bench_peers", records, markdown, out_dir=args.out, load_at_start=load)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
