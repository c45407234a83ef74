"""The paper recipes (configs/experiment/<table>/<cell>.yaml): they compose to the papers' settings,
reach every printed cell of the papers' tables exactly once, sweep per table, and ship in the wheel."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.types import Glob
from omegaconf import OmegaConf

from abnexp.config import compose as abnexp_compose
from abnexp.config import register_configs
from abnexp.report.experiments import experiments
from abnexp.report.paper_tables import TABLE3_MEMORY, TABLES, paper_values
from conftest import run_cli

OWN_FAMILIES = {"fashion_mnist"}  # abnexp's own recipe families: no paper table (experiment.paper "abnexp")
RECIPES = [m for m in experiments() if m["table"] not in OWN_FAMILIES]  # the papers' recipes
BY_NAME = {m["name"]: m for m in RECIPES}
CONFIGS = resources.files("abnexp.configs")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def composed():
    """{recipe name: composed config} for every recipe."""
    return {name: abnexp_compose([f"experiment={name}"]) for name in BY_NAME}


def test_recipes_are_the_cells_of_the_table_folders():
    folders = {f.name for f in (CONFIGS / "experiment").iterdir() if f.is_dir() and f.name != "__pycache__"}
    assert folders == set(TABLES) | OWN_FAMILIES
    assert not [f.name for f in (CONFIGS / "experiment").iterdir() if f.name.endswith(".yaml")]  # no flat recipes
    for table in TABLES:
        assert (CONFIGS / "experiment" / table / "_base.yaml").is_file(), table
    assert len(RECIPES) == 89
    for name, meta in BY_NAME.items():
        table, cell = name.split("/")
        assert meta["table"] == table and not cell.startswith("_")  # bases are not recipes


def test_list_shows_every_recipe_by_table_and_no_base(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for meta in RECIPES:
        line = next(line for line in out.splitlines() if line.split()[:1] == [meta["name"]])
        assert meta["row"] in line and (meta.get("column") or "") in line
    assert "_base" not in out
    assert "cbn_t3: CBN Table 3" in out and out.index("inplace_abn_t2:") < out.index("cbn_t3:")
    cbn_t3 = [line.split()[0] for line in out.splitlines() if line.strip().startswith("cbn_t3/")]
    assert cbn_t3[:3] == ["cbn_t3/bn_bs32", "cbn_t3/bn_bs16", "cbn_t3/bn_bs8"]  # the paper's row, column order


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_recipe_composes_to_its_listed_metadata(name, composed):
    cfg, meta = composed[name], BY_NAME[name]
    exp = OmegaConf.to_container(cfg.experiment)
    for key in ("paper", "table", "row", "world_size"):
        assert exp[key] == meta[key], key
    assert exp["column"] == meta.get("column")
    table = TABLES[exp["table"]]
    assert exp["row"] in table.rows
    assert exp["column"] is None or exp["column"] in [c.label for c in table.columns]
    assert exp["world_size"] in (4, 8)
    assert "reported" not in exp  # the paper's numbers live in abnexp.report.paper_tables


def test_every_printed_cell_is_reached_by_exactly_one_recipe():
    reached = Counter()
    for meta in RECIPES:
        labels = [c.label for c in TABLES[meta["table"]].columns]
        for label in [meta["column"]] if meta.get("column") else labels:
            reached[(meta["table"], meta["row"], label)] += 1
    printed = paper_values()
    assert len(printed) == 245
    assert {cell: reached[cell] for cell in printed} == {cell: 1 for cell in printed}
    for meta in RECIPES:  # and no recipe reproduces only cells the paper does not print
        assert any(cell[:2] == (meta["table"], meta["row"]) for cell in printed), meta["name"]


def test_paper_numbers_by_hand():
    t = TABLES["cbn_t3"]
    assert t.reported["CBN"] == (70.2, 70.2, 70.1, 70.0, 69.6, 69.3)
    assert t.reported["BN"][-1] is None  # BN at batch 1 is not printed
    printed = paper_values()
    assert printed[("inplace_abn_t2", "ResNeXt-101, std-BN (batch 256)", "224² center top-1")] == 77.04
    assert printed[("inplace_abn_t4", "WideResNet-38, InPlace-ABN sync, 12×776², class-uniform", "Vistas mIoU")] == 53.12
    assert ("inplace_abn_t4", "WideResNet-38, InPlace-ABN sync, 12×872²", "Vistas mIoU") not in printed
    assert printed[("cbn_t6", "R101+FPN Mask R-CNN CBN", "AP75 mask")] == 38.5
    assert printed[("mabn_t1", "MABN (2)", "top-1 error")] == 23.67


def _effective_lr(cfg, world_size: int) -> float:
    from abnexp.engine.optim import build_optimizer

    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, cfg.data.batch_size * world_size)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("name, batch, lr", [
    ("cbn_t3/cbn_bs2", 2, 0.1 * 2 / 32),  # the paper: lr 0.1 x (batch per GPU) / 32 on 4 GPUs
    ("cbn_t3/gn_bs1", 1, 0.1 * 1 / 32),
    ("cbn_t3/bn_bs32", 32, 0.1),
    ("cbn_t4/resnet50_bnbs4", 4, 0.1 * 4 / 32),
    ("cbn_t4/resnet50_bnbs32", 32, 0.1),
])
def test_cbn_imagenet_lr_follows_the_linear_rule_at_the_recipes_world_size(name, batch, lr, composed):
    cfg = composed[name]
    assert cfg.experiment.world_size == 4 and cfg.data.batch_size == batch
    assert _effective_lr(cfg, 4) == pytest.approx(lr, rel=1e-12)
    assert _effective_lr(cfg, 1) == pytest.approx(lr / 4, rel=1e-12)  # scaled to the processes running
    assert (cfg.optim.nesterov, cfg.optim.decay_norm_and_bias, cfg.optim.momentum) == (False, True, 0.9)
    assert (cfg.trainer.epochs, cfg.sched.name.value, cfg.sched.final_lr) == (100, "cosine", 0.0)


def test_cells_by_hand(composed):
    c = composed["cbn_t3/cbn_bs2"]
    assert (c.model.name, c.norm.name, c.data.name, c.norm.activation) == ("resnet18", "cbn", "imagenet", "relu")
    assert (c.norm.window, c.norm.burnin_iters) == (8, 4003625)

    c = composed["inplace_abn_t2/resnext101_inplace_abn"]
    assert (c.model.name, c.norm.name, c.data.batch_size, c.experiment.world_size) == ("resnext101", "inplace_abn", 64, 8)
    assert (c.optim.lr, c.optim.scale_lr, c.optim.nesterov, c.norm.activation) == (0.1, False, True, "leaky_relu")
    assert (c.sched.name.value, list(c.sched.milestones), c.trainer.epochs) == ("step", [30, 60], 90)
    c = composed["inplace_abn_t2/wideresnet38_inplace_abn"]
    assert (c.model.name, c.sched.name.value, c.sched.final_lr) == ("wideresnet38", "linear", 1e-6)

    c = composed["inplace_abn_sup_t1/relu_leaky"]
    assert (c.norm.name, c.norm.activation, list(c.experiment.eval_overrides)) == ("bn", "relu", ["norm.activation=leaky_relu"])

    c = composed["inplace_abn_t3/resnext101_coco_stuff_fixed_crop"]
    assert (c.task.name, c.model.name, c.norm.name, c.data.name) == ("semseg", "resnext101", "inplace_abn", "coco_stuff")
    assert (c.data.batch_size, c.data.crop_size, c.model.output_stride) == (6, 480, 8)  # 24 crops of 480² over 4 GPUs

    c = composed["inplace_abn_t4/wideresnet38_sync_12x776_uniform_vistas"]
    assert (c.data.name, c.norm.name, c.data.batch_size, c.data.crop_size) == ("vistas", "inplace_abn_sync", 3, 776)
    assert (c.data.class_uniform, c.task.eval_flip, list(c.task.eval_scales)) == (0.5, False, [1.0])
    assert composed["inplace_abn_t4/wideresnet38_sync_12x872"].data.name == "cityscapes"

    c = composed["mabn_t1/bn32"]
    assert (c.model.name, c.norm.name, c.norm.group_size, c.trainer.label_smoothing) == ("resnet50", "bn", 0, 0.1)
    assert composed["mabn_t1/mabn2"].norm.group_size == 2 and list(c.sched.milestones) == [30, 60, 90]

    c = composed["mabn_t3/syncbn_finetune"]
    assert (c.task.name, c.head.name, c.norm.name, c.data.batch_size, c.trainer.epochs) == (
        "detection", "mask_rcnn_fpn", "syncbn", 2, 24)
    assert (c.head.norm_placement, c.data.name) == ("everywhere", "coco")

    c = composed["cbn_t5/fixedbn_cbn"]
    assert (c.head.name, c.head.norm_placement, c.norm.window, c.norm.burnin_iters) == ("faster_rcnn_fpn", "heads", 4, 21987)
    assert composed["cbn_t5/gn_gn"].head.norm_placement == "everywhere"
    c = composed["cbn_t6/resnet101_mask_rcnn_fpn_gn"]
    assert (c.model.name, c.head.name, c.norm.name, c.head.norm_placement) == ("resnet101", "mask_rcnn_fpn", "gn", "heads")
    # the detection task's 1x schedule: lr 0.02 at 16 images, here 4 GPUs x 4
    assert _effective_lr(c, c.experiment.world_size) == pytest.approx(0.02)


def test_table3_recipes_match_the_papers_memory_figures(composed):
    columns = [c.label for c in TABLES["inplace_abn_t3"].columns]
    assert [m.column for m in TABLE3_MEMORY] == columns
    by_cell = {(c.experiment.row, c.experiment.column): c for n, c in composed.items() if n.startswith("inplace_abn_t3/")}
    for m in TABLE3_MEMORY:
        expected = {"std-BN + Leaky ReLU": ("bn", m.std_crops, m.crop),
                    "InPlace-ABN, fixed crop": ("inplace_abn", m.inplace_crops, m.crop),
                    "InPlace-ABN, fixed batch": ("inplace_abn", m.std_crops, m.fixed_batch_crop),
                    "InPlace-ABN sync, fixed batch": ("inplace_abn_sync", m.std_crops, m.fixed_batch_crop)}
        for row, (norm, batch, crop) in expected.items():
            c = by_cell[(row, m.column)]
            assert (c.model.name, c.norm.name, c.data.batch_size, c.data.crop_size) == (m.model, norm, batch, crop)


def test_table3_ratio_intervals_follow_from_the_counts():
    bounds = {m.column: m.ratio_bounds() for m in TABLE3_MEMORY}
    assert bounds["ResNeXt-101 Cityscapes"] == pytest.approx((1.40, 2.00))  # 4 -> 7 crops
    assert bounds["ResNeXt-101 COCO-Stuff"] == pytest.approx((1.20, 1.75))  # 4 -> 6
    assert bounds["WideResNet-38 Cityscapes"] == pytest.approx((7 / 6, 1.60))  # 5 -> 7
    assert bounds["WideResNet-38 COCO-Stuff"] == pytest.approx((7 / 6, 1.60))


def test_renames_map_every_old_flat_name_to_its_recipe():
    renames = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "experiment_renames.yaml"))
    assert len(renames) == 89 and set(renames.values()) == set(BY_NAME)
    for old, new in renames.items():
        assert old == new.replace("/", "_"), old  # <table>_<cell> -> <table>/<cell>
    assert renames["cbn_t3_cbn_bs2"] == "cbn_t3/cbn_bs2"


def test_a_table_sweep_selects_its_cells_and_composes_as_the_recipes(composed):
    """``abnexp train -m '+experiment/cbn_t3=glob(*,exclude=_*)'``: Hydra's glob lists the options of
    the folder's group, the base excluded, and each option composes as ``experiment=cbn_t3/<cell>``."""
    register_configs()
    with initialize_config_module(config_module="abnexp.configs", version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options("experiment/cbn_t3")
        swept = compose(config_name="config", overrides=["+experiment/cbn_t3=cbn_bs2"])
    cells = Glob(include=["*"], exclude=["_*"]).filter(options)
    assert [f"cbn_t3/{c}" for c in cells] == sorted(n for n in BY_NAME if n.startswith("cbn_t3/"))
    assert len(cells) == 22
    assert OmegaConf.to_container(swept) == OmegaConf.to_container(composed["cbn_t3/cbn_bs2"])


@pytest.mark.slow
def test_a_table_sweep_trains_each_cell(tmp_path, capsys):
    code, _, err = run_cli(["train", "-m", "+experiment/cbn_t3=glob(gn_bs1*,exclude=_*)", "data=demo",
                            "trainer.max_steps=1", "trainer.epochs=1", "data.crop_size=32",
                            "data.large_crop_size=32", "data.num_workers=0", f"hydra.sweep.dir={tmp_path}"], capsys)
    assert code == 0, err
    runs = sorted(p.parent.parent for p in tmp_path.glob("*/checkpoints/last.pt"))
    assert [OmegaConf.load(r / "config.yaml").experiment.column for r in runs] == ["bs 1", "bs 16"]


@pytest.mark.slow
def test_the_wheel_ships_every_recipe(tmp_path):
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ in it
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / item, src / item)
    for item in ("abnexp", "configs", "kernels"):
        shutil.copytree(REPO / item, src / item, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(src)], check=True)
    (wheel,) = (tmp_path / "wheel").glob("abnexp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in BY_NAME:
        assert f"abnexp/configs/experiment/{name}.yaml" in names, name
    for table in TABLES:
        assert f"abnexp/configs/experiment/{table}/_base.yaml" in names
    assert {"abnexp/configs/config.yaml", "abnexp/configs/experiment_renames.yaml",
            "abnexp/configs/norm/cbn.yaml"} <= names


def test_own_recipe_families_are_listed_without_a_paper_table(capsys):
    own = [m for m in experiments() if m["table"] in OWN_FAMILIES]
    assert {m["name"] for m in own} == {"fashion_mnist/resnet18_bn"}
    assert all(m["paper"] == "abnexp" and m["table"] not in TABLES for m in own)
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0 and "fashion_mnist: (no paper table)" in out and "fashion_mnist/resnet18_bn" in out
    c = abnexp_compose(["experiment=fashion_mnist/resnet18_bn"])
    assert (c.model.name, c.model.stem, c.norm.name, c.data.name, c.data.batch_size) == (
        "resnet18", "small_pool", "bn", "fashion_mnist", 32)
