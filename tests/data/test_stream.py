"""The streaming pipeline (pgl_fast.data.stream) on a tiny generated ImageNet-like tree.

References are torchvision's own transforms under torch's global generator (RandomResizedCrop,
RandomHorizontalFlip, Resize + CenterCrop) and PIL's colour conversion; the CLI runs compare a
killed-and-resumed run with an uninterrupted one (bit-identical weights), on another worker count.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import io as tvio
from torchvision import transforms as T
from torchvision.transforms import v2

from pgl_fast.data import stream as ds
from pgl_fast.config import TrainConfig
from pgl_fast.errors import UserError
from pgl_fast.tools.make_imagefolder import make_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """4 classes x 6 train / 2 test images, 40-90 px, width and height drawn apart."""
    return make_imagefolder("synthetic", tmp_path_factory.mktemp("tree") / "t", classes=4, train_per_class=6,
                            test_per_class=2, min_size=40, max_size=90, seed=3)


def _decode(path):
    return tvio.decode_image(str(path), mode=tvio.ImageReadMode.RGB)


def test_random_resized_crop_params_match_torchvision():
    for seed in range(40):
        for h, w in ((50, 90), (300, 40), (224, 224)):
            mine = ds.random_resized_crop_params(h, w, torch.Generator().manual_seed(seed))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                ref = T.RandomResizedCrop.get_params(torch.zeros(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
            assert mine == tuple(ref), (seed, h, w)


def test_train_and_eval_samples_match_torchvision(tree):
    stream = ds.load_stream(tree, recipe="imagenet", image_size=32, workers=0)
    assert stream.spec.mean == (0.485, 0.456, 0.406) and stream.spec.image_size == 32
    files = ds.ImageFiles(stream.train_files, stream.train_labels, ds.TrainTransform(stream.spec, "imagenet"))
    evals = ds.ImageFiles(stream.test_files, stream.test_labels, ds.EvalTransform(stream.spec, "imagenet"))
    # torchvision's v2 transforms: uint8 resampling as the stream does (v1 resamples in float)
    train_ref = v2.Compose([v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip()])
    eval_ref = v2.Compose([v2.Resize(37, antialias=True), v2.CenterCrop(32)])  # round(32 * 256 / 224) = 37
    for i in range(0, stream.num_train, 5):
        seed = ds.sample_seed(0, 1, i)
        x, y, err = files[(i, seed)]
        assert err is None and y == stream.train_labels[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ref = train_ref(_decode(stream.train_files[i]))
        assert x.dtype == torch.uint8 and torch.equal(x, ref), i
    for i in range(stream.num_test):
        x, _, err = evals[(i, None)]
        assert err is None and torch.equal(x, eval_ref(_decode(stream.test_files[i])))


def test_batches_do_not_depend_on_workers_and_differ_by_epoch(tree):
    stream = ds.load_stream(tree, recipe="imagenet", image_size=16, workers=0)
    keys = lambda epoch: [[(i, ds.sample_seed(0, epoch, i)) for i in b] for b in ([5, 0, 17], [3, 23, 9])]  # noqa: E731

    def read(workers, epoch):
        stream.workers = workers
        plan = ds._Plan()
        plan.keys = keys(epoch)
        return [x for x, _ in ds._batches_of(stream.loader("train", plan, torch.device("cpu")))]

    a, b = read(0, 0), read(2, 0)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and len(a) == 2
    assert not torch.equal(read(0, 1)[0], a[0])


def test_grey_and_cmyk_are_converted_bad_files_named_or_skipped(tmp_path):
    root = make_imagefolder("synthetic", tmp_path / "t", classes=2, train_per_class=3, test_per_class=1,
                            min_size=20, max_size=30)
    cls = sorted(os.listdir(root / "train"))
    rgb = Image.fromarray(torch.randint(0, 256, (20, 24, 3), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8).numpy())
    rgb.convert("L").save(root / "train" / cls[0] / "grey.png")
    rgb.convert("CMYK").save(root / "train" / cls[1] / "cmyk.jpg")
    for name in ("grey.png", "cmyk.jpg"):
        path = next((root / "train").glob(f"*/{name}"))
        img = ds._read_image(str(path))
        with Image.open(path) as im:
            ref = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        assert img.shape == ref.shape and img.shape[0] == 3
        # a grey image is copied into every channel exactly; CMYK->RGB may round differently by 1-2
        assert (img.int() - ref.int()).abs().max() <= (0 if name == "grey.png" else 2), name

    good = next((root / "train" / cls[0]).glob("*.jpg"))
    (root / "train" / cls[0] / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (root / "train" / cls[1] / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    stream = ds.load_stream(root, recipe="imagenet", image_size=16, workers=0)
    plan = ds._Plan()
    plan.keys = [[(i, 1) for i in range(stream.num_train)]]
    with pytest.raises(UserError) as e:
        next(ds._batches_of(stream.loader("train", plan, torch.device("cpu"))))
    msg = str(e.value)
    assert "\n" not in msg and "corrupt.jpg" in msg and "--skip-bad-images" in msg
    skipped = ds.load_stream(root, recipe="imagenet", image_size=16, workers=1, skip_bad=True)
    assert skipped.meta["skipped_images"] == 2 and skipped.num_train == stream.num_train - 2
    assert any("truncated.jpg" in f for f in skipped.meta["skipped_files"])

    for f in (root / "test" / cls[0]).iterdir():
        f.unlink()
    with pytest.raises(UserError, match=f"class folder .*{cls[0]} has no images"):
        ds.load_stream(root, recipe="imagenet", image_size=16)


def test_pipeline_choice_and_refusals(tree):
    assert ds.choose_pipeline("auto", "imagefolder", "imagenet", tree, 4096) == "stream"
    assert ds.choose_pipeline("auto", "imagefolder", "cifar10", tree, 4096) == "resident"
    assert ds.choose_pipeline("auto", "imagefolder", "cifar10", tree, 0.01) == "stream"  # 32 x 3 x ~60 x ~60 B
    assert ds.choose_pipeline("auto", "cifar10", "cifar10", None, 1) == "resident"
    with pytest.raises(UserError, match="--data-pipeline: resident cannot train --recipe imagenet"):
        TrainConfig(dataset="imagefolder", recipe="imagenet", data_pipeline="resident")
    with pytest.raises(UserError, match="--data-pipeline: stream reads ImageFolder trees"):
        TrainConfig(dataset="synthetic", data_pipeline="stream")


def test_infopro_imagenet_cuts():
    cfg = TrainConfig(arch="torchvision:resnet101", split="infopro", modules=2)
    assert cfg.cut_list == ["layer2.0"] and cfg.modules == 2
    assert TrainConfig(arch="torchvision:resnet152", split="infopro", modules=2).cut_list == ["layer2.5"]
    with pytest.raises(UserError, match="-J 4 has no InfoPro ImageNet split for torchvision:resnet50; supported J: 2"):
        TrainConfig(arch="torchvision:resnet50", split="infopro", modules=4)
    with pytest.raises(UserError, match="not torchvision:vgg11"):
        TrainConfig(arch="torchvision:vgg11", split="infopro", modules=2)


# -- the CLI: kill mid-epoch and resume, bit-identical ------------------------------------------------

ARGS = ["--dataset", "imagefolder", "--recipe", "imagenet", "--image-size", "32", "--arch", "resnet8", "-J", "2",
        "--split", "even", "--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2", "-b", "8", "--lr", "0.05",
        "--device", "cpu", "--progress", "off", "--save-every", "1", "--deterministic"]


def cli(tree, out, *extra, kill=None):
    env = {k: v for k, v in os.environ.items() if k != "PGL_FAST_KILL_AT"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    if kill:
        env["PGL_FAST_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "pgl_fast.train", *ARGS, "--data-dir", str(tree), "-o", str(out),
                           *extra], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.slow  # three CLI runs, about 35 s on this 2-core machine
def test_cli_stream_kill_mid_epoch_resume_is_bit_identical(tree, tmp_path):
    ref = cli(tree, tmp_path / "ref", "--workers", "0")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = cli(tree, tmp_path / "run", "--workers", "2", kill="2:1")  # the global epoch, after its step 1
    assert killed.returncode != 0
    resumed = cli(tree, tmp_path / "run", "--workers", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ckpt-e0001-s000001.pt" in resumed.stdout
    final = "checkpoints/ckpt-e0002-s000000.pt"
    a = torch.load(tmp_path / "ref" / final, map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "run" / final, map_location="cpu", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    strip = lambda r: {k: v for k, v in r.items() if k not in ("images_per_s", "epoch_seconds", "peak_mem_mib",  # noqa: E731
                                                                 "peak_reserved_mib")}
    read = lambda p: [strip(json.loads(x)) for x in open(p / "metrics.jsonl")]  # noqa: E731
    assert read(tmp_path / "ref") == read(tmp_path / "run")
    header = json.load(open(tmp_path / "run" / "header.json"))
    assert header["data_pipeline"] == "stream" and header["skipped_images"] == 0


@pytest.mark.slow  # a torchrun launch of 2 gloo ranks plus a one-process run, about 40 s here
def test_torchrun_two_ranks_stream_equals_one_process(tree, tmp_path):
    """Data parallel over 2 gloo ranks with synchronised batch norm, each rank decoding only its
    shard of every global batch of 8 (24 images: three even steps): the same images per step as
    one process, so accuracies are identical and losses/weights equal to fp32 summation order."""
    one = cli(tree, tmp_path / "one", "--workers", "1")
    assert one.returncode == 0, one.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PGL_FAST_KILL_AT"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "pgl_fast.train", *ARGS, "--data-dir", str(tree), "-o", str(tmp_path / "two"),
                          "--workers", "1", "--sync-bn"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda p: [json.loads(x) for x in open(p / "metrics.jsonl")]  # noqa: E731
    for a, b in zip(read(tmp_path / "one"), read(tmp_path / "two"), strict=True):
        assert {k: b[k] for k in ("phase", "train_acc", "test_acc", "head_acc")} == \
            {k: a[k] for k in ("phase", "train_acc", "test_acc", "head_acc")}
        for k in ("train_loss", "test_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), k
    final = "checkpoints/ckpt-e0002-s000000.pt"
    wa = torch.load(tmp_path / "one" / final, map_location="cpu", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / final, map_location="cpu", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5, msg=k)
    assert json.load(open(tmp_path / "two" / "header.json"))["world_size"] == 2


@pytest.mark.slow  # builds torchvision's ResNet-50 and its memory plan: about 30 s here
def test_cli_torchvision_resnet50_infopro_split_streams(tree, tmp_path):
    """The issue's command, shrunk: ResNet-50 cut by --split infopro -J 2 (after layer2.0), 32 px crops."""
    out = tmp_path / "r50"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PGL_FAST_KILL_AT", None)
    r = subprocess.run([sys.executable, "-m", "pgl_fast.train", "--dataset", "imagefolder", "--data-dir", str(tree),
                        "--recipe", "imagenet", "--image-size", "32", "--arch", "torchvision:resnet50", "--split",
                        "infopro", "-J", "2", "--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2", "-b", "4",
                        "--train-subset", "8", "--test-subset", "4", "--lr", "0.05", "--device", "cpu",
                        "--workers", "1", "--progress", "off", "-o", str(out)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(--cuts layer2.0)" in r.stdout
    header = json.load(open(out / "header.json"))
    assert header["data_pipeline"] == "stream" and header["train_images"] == 8
    assert len(json.load(open(out / "config.json"))["cuts"].split(",")) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_are_pinned_copies_of_the_cpu_ones(tree):
    """On a GPU the loader pins its batches and the copies are non-blocking; the normalised
    batches equal those of the same stream on the CPU."""
    stream = ds.load_stream(tree, recipe="imagenet", image_size=16, workers=1)
    assert stream.loader("train", ds._Plan(), torch.device("cuda")).pin_memory
    out = {}
    for dev in ("cpu", "cuda"):
        bound = ds.BoundStream(stream, dev, False, 4, torch.float32, seed=0)
        batches = [torch.tensor([3, 1, 7, 0], device=dev), torch.tensor([5, 2], device=dev)]
        bound.begin_epoch(0, batches, 0)
        out[dev] = [bound.train_batch(b, None, True) for b in batches]
    for (xc, yc, ic), (xg, yg, ig) in zip(out["cpu"], out["cuda"]):
        assert xg.is_cuda and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ig.cpu(), ic, rtol=0, atol=0)
