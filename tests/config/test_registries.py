"""The aux-head and data-set registries: unknown names, registration, the CLI's choices, and the
entries' fields driving the refusals, defaults and no-effect warnings that used to test names.
Expected messages and values are written out by hand; every entry a test registers is removed
afterwards (``clean_registries``)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgl_fast.config.build import method_of, resolve_head_kernels
from pgl_fast.core.methods import DGL, register_method
from pgl_fast.config import TrainConfig, build_parser, config_from_args, explicit_fields
from pgl_fast.data import DatasetSource, Splits, load_dataset, register_dataset
from pgl_fast.errors import UserError
from pgl_fast.models.heads import HeadSpec, build_head, register_head


BUILTIN_HEADS = "0c1f, 0c2f, 1c1f, 1c2f, 1c3f, 2c2f, adapt, mlpsr"
BUILTIN_DATASETS = "cifar10, svhn, stl10, imagefolder, synthetic"


# what a test registers leaves with it; tiny CLI runs on one thread
pytestmark = pytest.mark.usefixtures("restored_registries", "one_thread")


def pool_linear(in_shape, out_dim, widen=1.0, feature_dim=128):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_shape[0], out_dim))


def tiny_loader(channels=3, dtype=torch.uint8):
    def load(request):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (6, channels, 4, 4), generator=g).to(dtype)
        return Splits((x, torch.tensor([0, 1, 2, 0, 1, 2])), (x[:3], torch.tensor([2, 1, 0])), ("a", "b", "c"))

    return load


# -- aux heads -------------------------------------------------------------------------------------

def test_unknown_head_is_one_line_listing_the_registered_ones():
    with pytest.raises(UserError) as e:
        build_head("nope", (8, 4, 4), 10)
    assert str(e.value) == f"--aux 'nope' is not one of {BUILTIN_HEADS}"
    register_head("poollinear", HeadSpec(pool_linear, "pool, linear"))
    with pytest.raises(UserError, match=f"is not one of {BUILTIN_HEADS}, poollinear$"):
        build_head("nope", (8, 4, 4), 10)


def test_a_registered_head_is_built_by_name_and_is_a_cli_choice():
    with pytest.raises(SystemExit):  # argparse refuses it before it is registered
        build_parser().parse_args(["--aux", "poollinear"])
    register_head("poollinear", HeadSpec(pool_linear, "pool, linear"))
    head = build_head("poollinear", (8, 4, 4), 10)
    assert head(torch.randn(2, 8, 4, 4)).shape == (2, 10)
    assert head.spec == {"config": "poollinear", "in_shape": (8, 4, 4), "out_dim": 10, "widen": 1.0, "feature_dim": 128}
    # choices are read when a command line is parsed, so one registered after import is accepted
    assert config_from_args(["--aux", "poollinear", "--method", "dgl"]).aux == "poollinear"
    with pytest.raises(UserError, match="registered already"):
        register_head("poollinear", HeadSpec(pool_linear, "again"))
    with pytest.raises(UserError, match="must be a HeadSpec"):
        register_head("other", pool_linear)


def test_head_kernels_triton_is_refused_exactly_for_heads_without_a_kernel():
    cpu = torch.device("cpu")
    with pytest.raises(UserError) as e:
        resolve_head_kernels(TrainConfig(method="dgl", aux="mlpsr", head_kernels="triton"), cpu)
    assert str(e.value) == "--head-kernels triton: the mlpsr head has no fused kernel; use --head-kernels eager"
    register_head("poollinear", HeadSpec(pool_linear, "pool, linear"))
    with pytest.raises(UserError) as e:
        resolve_head_kernels(TrainConfig(method="dgl", aux="poollinear", head_kernels="triton"), cpu)
    assert str(e.value) == "--head-kernels triton: the poollinear head has no fused kernel; use --head-kernels eager"
    # the field, not the name, decides: with fused_kernel the check passes on to Triton's own
    register_head("poollinear", HeadSpec(pool_linear, "pool, linear", fused_kernel=True), replace=True)
    try:
        resolve_head_kernels(TrainConfig(method="dgl", aux="poollinear", head_kernels="triton"), cpu)
    except UserError as err:
        assert "no fused kernel" not in str(err)


def test_infopro_takes_only_heads_marked_infopro():
    want = "--aux: InfoPro uses InfoPro's AuxClassifier heads: 0c1f, 0c2f, 1c1f, 1c2f, 1c3f or 2c2f"
    for aux in ("adapt", "mlpsr"):
        with pytest.raises(UserError) as e:
            TrainConfig(method="infopro", aux=aux)
        assert str(e.value) == want
    register_head("poollinear", HeadSpec(pool_linear, "pool, linear"))
    with pytest.raises(UserError) as e:
        TrainConfig(method="infopro", aux="poollinear")
    assert str(e.value) == want
    register_head("poollinear", HeadSpec(pool_linear, "pool, linear", infopro=True), replace=True)
    assert TrainConfig(method="infopro", aux="poollinear").aux == "poollinear"
    TrainConfig(method="dgl", aux="mlpsr")  # DGL takes every head


def test_fixed_width_heads_warn_that_widen_has_no_effect():
    register_head("poollinear", HeadSpec(pool_linear, "pool, linear", fixed_width="it has no hidden layer"))
    register_head("wide", HeadSpec(pool_linear, "pool, linear"))
    argv = ["--method", "dgl", "--aux-widen", "2", "--aux"]
    assert warnings_of(argv + ["poollinear"]) == [
        "warning: --aux-widen has no effect with --aux poollinear (it has no hidden layer)"]
    assert warnings_of(argv + ["wide"]) == []


def warnings_of(argv):
    return config_from_args(argv).no_effect_warnings(explicit_fields(argv))


# -- data sets -------------------------------------------------------------------------------------

def test_unknown_data_set_is_one_line_listing_the_registered_ones():
    with pytest.raises(UserError) as e:
        load_dataset("nope", None)
    assert str(e.value) == f"unknown dataset 'nope': choose one of {BUILTIN_DATASETS}"
    register_dataset("tiny", DatasetSource(tiny_loader(), "six 4x4 images", reads="generated"))
    with pytest.raises(UserError) as e:
        load_dataset("nope", None)
    assert str(e.value) == f"unknown dataset 'nope': choose one of {BUILTIN_DATASETS}, tiny"


def test_a_registered_data_set_loads_and_is_a_cli_choice():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dataset", "tiny"])
    register_dataset("tiny", DatasetSource(tiny_loader(), "six 4x4 images", reads="generated", recipe="svhn"))
    data = load_dataset("TINY", None)  # names are matched in lower case, as before
    assert tuple(data.train_x.shape) == (6, 3, 4, 4)
    assert (data.train_y.tolist(), data.test_y.tolist()) == ([0, 1, 2, 0, 1, 2], [2, 1, 0])
    # the svhn recipe at these images' size and class count; svhn's pad 2 stays below 4 pixels
    s = data.spec
    assert (s.name, s.num_classes, s.image_size) == ("tiny", 3, 4)
    assert (s.pad, s.pad_mode, s.flip, s.mean) == (2, "zeros", False, (0.5,) * 3)
    assert data.meta["root"] is None
    assert config_from_args(["--dataset", "tiny"]).dataset == "tiny"
    assert "tiny" in build_parser().format_help()
    with pytest.raises(UserError, match="lower-case"):
        register_dataset("Tiny", DatasetSource(tiny_loader(), "x", reads="generated"))
    with pytest.raises(UserError, match="registered already"):
        register_dataset("tiny", DatasetSource(tiny_loader(), "x", reads="generated"))
    with pytest.raises(UserError, match="reads 'web' is not one of download, imagefolder, files, generated"):
        DatasetSource(tiny_loader(), "x", reads="web")


@pytest.mark.parametrize("loader, message", [
    (tiny_loader(dtype=torch.float32), "dataset bad: its train images must be a uint8 [N, C, H, W] tensor"),
    (tiny_loader(channels=1), "dataset bad: its images have 1 channel(s) but its recipe (bad) normalises 3"),
])
def test_a_loader_with_the_wrong_layout_is_refused(loader, message):
    register_dataset("bad", DatasetSource(loader, "bad", reads="generated"))
    with pytest.raises(UserError) as e:
        load_dataset("bad", None)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, batch, lr, recipe, split_table", [
    ([], 1024, 0.8, "cifar10", "cifar10"),
    (["--dataset", "svhn"], 1024, 0.8, "svhn", "cifar10"),
    (["--dataset", "stl10"], 128, 0.1, "stl10", "stl10"),
    (["--dataset", "synthetic"], 1024, 0.8, "cifar10", "cifar10"),
    (["--dataset", "synthetic", "--recipe", "stl10"], 128, 0.1, "stl10", "stl10"),  # generated at its recipe
    (["--dataset", "imagefolder", "--recipe", "stl10"], 128, 0.1, "stl10", "stl10"),
    (["--dataset", "imagefolder", "--recipe", "svhn"], 1024, 0.8, "svhn", "cifar10"),
    (["--dataset", "imagefolder", "--recipe", "imagenet", "--data-pipeline", "stream"], 1024, 0.8, "imagenet",
     "cifar10"),
    (["--dataset", "tiny"], 256, 0.3, "stl10", "stl10"),
    (["--dataset", "tiny", "-b", "8", "--lr", "0.01"], 8, 0.01, "stl10", "stl10"),
])
def test_defaults_come_from_the_data_set_entry(argv, batch, lr, recipe, split_table):
    register_dataset("tiny", DatasetSource(tiny_loader(), "x", reads="generated", recipe="stl10", batch_size=256,
                                           lr=0.3, split_table="stl10"))
    cfg = config_from_args(["--arch", "resnet110", "-J", "2"] + argv)
    assert (cfg.batch_size, cfg.lr, cfg.recipe_name, cfg.split_recipe) == (batch, lr, recipe, split_table)


def test_what_a_data_set_reads_decides_the_no_effect_warnings():
    register_dataset("made", DatasetSource(tiny_loader(), "x", reads="generated"))
    register_dataset("ownfiles", DatasetSource(tiny_loader(), "x", reads="files"))
    register_dataset("tree", DatasetSource(tiny_loader(), "x", reads="imagefolder", recipe=None))
    assert warnings_of(["--dataset", "made", "--data-dir", "/x"]) == [
        "warning: --data-dir has no effect with --dataset made (generated in memory)"]
    assert warnings_of(["--dataset", "ownfiles", "--no-download"]) == [
        "warning: --no-download has no effect with --dataset ownfiles (nothing is downloaded)"]
    assert warnings_of(["--dataset", "made", "--synthetic-train", "8"]) == [
        "warning: --synthetic-train has no effect with --dataset made"]
    assert warnings_of(["--dataset", "made", "--recipe", "svhn"]) == [
        "warning: --recipe has no effect with --dataset made (only imagefolder, synthetic and tree take a recipe)"]
    assert warnings_of(["--dataset", "tree", "--recipe", "svhn"]) == []
    assert warnings_of(["--dataset", "tree", "--workers", "4", "--data-pipeline", "stream"]) == []
    with pytest.raises(UserError, match="--data-pipeline: stream reads ImageFolder trees; --dataset ownfiles"):
        config_from_args(["--dataset", "ownfiles", "--data-pipeline", "stream"])


class _Smooth(DGL):
    """DGL whose local loss smooths the labels: a method registered from outside the package."""

    local_loss_is_ce = False

    def local_loss(self, model, j, h, y, **kw):
        return F.cross_entropy(model.heads[j](h), y, label_smoothing=0.1)


def test_a_registered_method_is_a_cli_method_and_pgl_local(tmp_path):
    with pytest.raises(UserError) as e:
        TrainConfig(method="smooth")
    assert str(e.value) == "--method: 'smooth' is not one of bp, dgl, infopro, man, pgl, hpff"
    register_method("smooth", _Smooth)
    assert config_from_args(["--method", "smooth"]).method == "smooth"
    assert config_from_args(["--pgl-local", "smooth"]).pgl_local == "smooth"
    assert isinstance(method_of(config_from_args(["--method", "pgl", "--pgl-local", "smooth"])).local, _Smooth)
    with pytest.raises(UserError, match=r"^register_method: method 'smooth' is registered already; pass replace=True"):
        register_method("smooth", _Smooth)
    with pytest.raises(UserError, match=r"^register_method\('plain'\): the method class must be a subclass of Method"):
        register_method("plain", object)
