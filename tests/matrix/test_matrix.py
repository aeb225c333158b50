"""Exact in every combination: two steps of every method x model x strategy x runtime, in
float64, against the independent plain-autograd reference of ``matrix_reference.py``.

- methods: DGL, InfoPro, PGL(1, 1) (a local step, then a global one) over DGL's loss and over
  InfoPro's, BP, MAN over DGL's loss, PGL over MAN over InfoPro's, HPFF over InfoPro's (patch
  decoders), PGL over HPFF over DGL's;
- models: ``cifar_resnet`` (resnet8, J=3), ``split()`` of a torchvision ResNet (batch norm in the
  stem, outside the blocks), ``split()`` of a torchvision VGG with batch norm, a small ViT;
- strategies: one process; data parallel on 2 gloo ranks with ``--sync-bn`` and unequal shards
  (3 + 2); data parallel with per-rank batch norm; a pipeline of 2 stages with M = 1 and M = 2
  micro-batches in global steps;
- runtimes: eager, checkpointed global steps, ``torch.compile``.

Every parameter and batch-norm buffer after the two steps must equal the reference within 1e-9
(relative; the cells in ``TOLERANCE`` looser, each with its measured reason). Each distributed
strategy runs all its cells in one set of two worker processes (``matrix_worker.py``).
Combinations the engine refuses are in ``REFUSALS`` (each cell asserts the exact one-line error;
the same list is the table of docs/combinations.md); cells failing on a known defect are in
``KNOWN_DEFECTS`` (strict xfail: delete the entry when its fix lands).

``compile`` costs ~10-17 s of CPU per cell (Inductor, float64); by default only the cells in
``COMPILE_BY_DEFAULT`` run, the rest are skipped with that reason; ``PGL_MATRIX_COMPILE=all`` runs
them all."""
from __future__ import annotations

import functools
import itertools
import os

import pytest
import torch

import matrix_cases as C
import matrix_reference as R
import matrix_worker
from pgl_fast import LocalLearner
from pgl_fast.config import TrainConfig
from pgl_fast.distributed.pipeline import build_stage, run_local_group
from pgl_fast.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(REPO, "docs", "combinations.md")
RTOL, ATOL = 1e-9, 1e-12
# cells whose result is too sensitive to rounding for 1e-9: (method, model, strategy) -> (rtol, atol).
# MAN over a torchvision ResNet with per-rank batch norm: module 1's aux path runs the copies of
# layer3's first block, whose batch norms see 1x1 feature maps of only 3 or 2 samples per rank; a
# 1e-15 relative change of the input moves the reference's own parameters by up to 1.3e-8 after
# the two steps (DGL's: 2e-11), and the engine differs from it by up to 5e-10
TOLERANCE = {("man", "tv_resnet", "dp_rankbn"): (1e-7, 1e-9)}
ANY = "*"
PIPE = ("pipe_m1", "pipe_m2")
DECODERS = ("infopro", "pgl_infopro", "pgl_man")  # InfoPro's decoders (pgl_man: MAN over InfoPro)
MAN = ("man", "pgl_man")
HPFF = ("hpff", "pgl_hpff")
SPLIT_CNN = ("tv_resnet", "vgg_bn")
CNN = ("cifar_resnet", "tv_resnet", "vgg_bn")  # the models with batch norm (and InfoPro's decoders)
WITH_GLOBAL = ("pgl", "pgl_infopro", "bp", "pgl_man", "pgl_hpff")


def _matches(pattern, cell) -> bool:
    return all(p == ANY or v == p or (isinstance(p, tuple) and v in p) for p, v in zip(pattern, cell))


# -- refusals: (method, model, strategy, runtime) pattern, how it is asked for, the one line -----------
# the command line's flags for each method of the matrix (the loss weights are the API's business)
CLI_METHOD = {"pgl_infopro": dict(method="pgl", pgl_local="infopro"),
              "pgl_man": dict(method="pgl", pgl_local="man", man_base="infopro"),
              "hpff": dict(method="hpff", hpff_base="infopro"),
              "pgl_hpff": dict(method="pgl", pgl_local="hpff", hpff_base="dgl")}


def _cli(**flags):
    def ask(method, model, strategy, runtime):
        TrainConfig(**CLI_METHOD.get(method, dict(method=method)), **flags)
    return ask


def _api_learner(method, model, strategy, runtime):
    LocalLearner(C.build_model(model, method), C.method_of(method), **C.learner_kwargs("eager"))


def _api_learner_as_asked(method, model, strategy, runtime):
    LocalLearner(C.build_model(model, method), C.method_of(method), **C.learner_kwargs(runtime))


# what MAN and HPFF refuse, as the engine words it (one list per method: Method.refuses); the
# reasons are spelled out here, not read from the engine, so that a change of them shows in this test
_HPFF_PIPE = ("is not supported with HPFF: its loss reaches two modules, so the stages would have to pass gradients "
              "back upstream mid-step; data parallel is exact")
_HPFF_COMPILE = "is not supported with HPFF: the compiled pieces run one module at a time, and its loss reaches two"
_MAN_PIPE = ("is not supported with MAN: module j's EMA copy follows module j+1, which would live on another "
             "stage's rank; train it in one process or data parallel (torchrun without --pipeline)")

REFUSALS = [
    ((DECODERS, "vit", ANY, ANY), "API", _api_learner,
     "InfoPro reconstructs the input image from (C, H, W) feature maps; module 0 outputs features of shape (5, 8)"),
    (("hpff", "vit", ANY, ANY), "API", _api_learner,
     "HPFF: patch decoders need (C, H, W) feature maps; module 1 outputs (5, 8) (use HPFF(base=DGL()) for other "
     "features)"),
    ((HPFF, ANY, PIPE, ANY), "CLI --pipeline 2", _cli(pipeline=2), f"--pipeline: {_HPFF_PIPE}; drop --pipeline"),
    ((MAN, ANY, PIPE, ANY), "CLI --pipeline 2", _cli(pipeline=2), f"--pipeline: {_MAN_PIPE}; drop --pipeline"),
    ((HPFF, ANY, ANY, "compile"), "CLI --compile", _cli(compile=True), f"--compile: {_HPFF_COMPILE}; drop --compile"),
    # the learner refuses compile before a data-parallel learner or a pipeline stage can refuse anything
    ((HPFF, ANY, ANY, "compile"), "API LocalLearner(compile=True)", _api_learner_as_asked,
     f"compile: {_HPFF_COMPILE}; build the LocalLearner without compile"),
    ((HPFF, ANY, PIPE, "eager"), "API build_stage(LocalLearner(...), 2)", None, f"build_stage: {_HPFF_PIPE}"),
    ((MAN, ANY, PIPE, "eager"), "API build_stage(LocalLearner(...), 2)", None, f"build_stage: {_MAN_PIPE}"),
    ((ANY, ANY, PIPE, "compile"), "CLI --pipeline 2 --compile", _cli(pipeline=2, compile=True),
     "--pipeline: runs eager steps; drop --compile"),
    ((ANY, ANY, PIPE, "ckpt"), "CLI --pipeline 2 --checkpoint-global", _cli(pipeline=2, checkpoint_global=True),
     "--pipeline: global steps are not checkpointed in a pipeline (each stage holds only its own modules' "
     "graphs); drop --checkpoint-global / use --global-memory none"),
    ((ANY, ANY, "dp_syncbn", "compile"), "CLI --sync-bn --compile", _cli(sync_bn=True, compile=True),
     "--sync-bn: is not traced by --compile; drop one of them"),
    ((ANY, ANY, "dp_syncbn", "compile"), "API DataParallelLearner(sync_bn=True, compile=True)", None,
     "--sync-bn with --compile is not supported: the compiled pieces would trace the batch-norm all-reduces; "
     "drop one of the two flags"),
]

# -- known defects (strict xfail): delete an entry when its fix lands ----------------------------------
KNOWN_DEFECTS: dict = {}  # every defect the matrix found is fixed; a new one goes here with its reason

# compile cells that run by default (the others cost ~10-17 s of CPU each)
COMPILE_BY_DEFAULT = {("pgl", "cifar_resnet", "one"), ("bp", "cifar_resnet", "one"),
                      ("infopro", "tv_resnet", "one")}

CELLS = list(itertools.product(C.METHODS, C.MODELS, C.STRATEGIES, C.RUNTIMES))


def refusals_of(cell) -> list:
    """The rows that refuse ``cell``: every command-line row that matches, and the first matching API
    row (REFUSALS is in the order the API checks: the first refusal it meets is the one it raises)."""
    rows = [r for r in REFUSALS if _matches(r[0], cell)]
    api = [r for r in rows if r[1].startswith("API")]
    return [r for r in rows if not r[1].startswith("API")] + api[:1]


def defects_of(cell) -> list[str]:
    """The known defects that make ``cell`` fail. A refused cell only checks its refusal, which an
    entry breaks only where it says so: it must name the strategy (not ANY)."""
    refused = bool(refusals_of(cell))
    return [reason for pattern, reason in KNOWN_DEFECTS.items()
            if _matches(pattern, cell) and not (refused and pattern[2] == ANY)]


def compile_skipped(cell) -> bool:
    method, model, strategy, runtime = cell
    return runtime == "compile" and os.environ.get("PGL_MATRIX_COMPILE") != "all" and (
        method, model, strategy) not in COMPILE_BY_DEFAULT


def runnable(strategy: str) -> list[tuple[str, str, str]]:
    """The cells the worker processes of ``strategy`` run: those not refused, and those whose refusal
    only a process group can ask for."""
    out = []
    for m, mo, s, rt in CELLS:
        refused = refusals_of((m, mo, s, rt))
        if s == strategy and (any(r[2] is None for r in refused) or
                              not refused and not compile_skipped((m, mo, s, rt))):
            out.append((m, mo, rt))
    return out


def _param(cell):
    marks = []
    reasons = defects_of(cell)
    if reasons and (refusals_of(cell) or not compile_skipped(cell)):  # skipped cells are not run
        marks.append(pytest.mark.xfail(strict=True, reason="; ".join(reasons)))
    return pytest.param(*cell, marks=marks, id="-".join(cell))


# -- the reference ---------------------------------------------------------------------------------------
BN_MODE = {  # strategy -> batch norm of (local steps, global steps), see matrix_reference
    "one": ("full", "full"), "dp_syncbn": ("full", "full"), "dp_rankbn": ("rank0", "rank0"),
    "pipe_m1": ("full", "full"), "pipe_m2": ("full", "sequential"),
}


@functools.lru_cache(maxsize=None)
def reference(method: str, model: str, strategy: str) -> dict:
    net = C.build_model(model, method)
    # what the method adds to the network (InfoPro's decoders of a split() model, MAN's copies,
    # HPFF's second heads and patch decoders): same seed, same draws as the engine's learner
    C.method_of(method).prepare(net)
    net.double()
    bn_local, bn_global = BN_MODE[strategy]
    R.train(net, C.batches(), phases=C.phases(method), kind=C.local_kind(method),
            heads=method != "bp", lambdas=C.INFOPRO_LAMBDAS, lr=C.LR, momentum=C.MOMENTUM, wd=C.WD,
            man_momentum=C.MAN_MOMENTUM, hpff=(C.HPFF_WX, C.HPFF_WY, C.HPFF_PATCHES),
            bn_local=bn_local, bn_global=bn_global, shards=tuple(len(c) for c in torch.arange(C.BATCH).tensor_split(2)))
    return C.state(net)


def one_process(method, model, runtime, device="cpu") -> dict:
    net = C.build_model(model, method).to(device)
    learner = LocalLearner(net, C.method_of(method), **C.learner_kwargs(runtime))
    for e, (x, y, im) in enumerate(C.batches()):
        learner.start_epoch(e)
        learner.step(x.to(device), y.to(device), im.to(device) if C.needs_image(method) else None)
    return {k: v.cpu() for k, v in C.state(net).items()}


def assert_states(got: dict, ref: dict, what: str, buffers: bool = True, tol=(RTOL, ATOL)) -> None:
    keys = [k for k in ref if buffers or not _is_bn_buffer(k)]
    assert set(k for k in got if buffers or not _is_bn_buffer(k)) == set(keys), what
    for k in keys:
        torch.testing.assert_close(got[k], ref[k], rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {k}: {m}")


def _is_bn_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.fixture(scope="module")
def strategy_results():
    """strategy -> {(method, model, runtime): per-rank results}: one set of two gloo processes per
    strategy runs all its cells, the first time a cell of that strategy asks."""
    cache = {}

    def get(strategy):
        if strategy not in cache:
            res = run_local_group(matrix_worker.run, 2, strategy, runnable(strategy), timeout_s=60,
                                  join_timeout_s=600)
            for r, rr in enumerate(res):
                assert rr is not None and rr[0] == "ok", f"{strategy}: rank {r}: {rr}"
            cache[strategy] = {cell: [rr[1][cell] for rr in res] for cell in res[0][1]}
        return cache[strategy]

    return get


@pytest.mark.parametrize("method,model,strategy,runtime", [_param(c) for c in CELLS])
def test_cell(method, model, strategy, runtime, strategy_results, one_thread):
    cell = (method, model, strategy, runtime)
    refused = refusals_of(cell)
    for _, how, ask, message in refused:
        if ask is None:  # asked for by the worker processes (needs a process group)
            res = strategy_results(strategy)[(method, model, runtime)]
            assert res[0]["error"] == f"rank 0: UserError: {message} | rank 1: UserError: {message}", how
            continue
        with pytest.raises(UserError) as e:
            ask(*cell)
        assert str(e.value) == message, how
    if refused:
        return
    if compile_skipped(cell):
        pytest.skip("compile: ~10-17 s of CPU per cell; PGL_MATRIX_COMPILE=all runs it")
    ref = reference(method, model, strategy)
    if strategy == "one":
        assert_states(one_process(method, model, runtime), ref, "one process")
        return
    ranks = strategy_results(strategy)[(method, model, runtime)]
    if ranks[0]["error"] is not None:
        pytest.fail(ranks[0]["error"])
    if strategy.startswith("pipe"):
        merged = {**ranks[0]["state"], **ranks[1]["state"]}
        assert_states(merged, ref, strategy)
    elif strategy == "dp_syncbn":
        for r in range(2):
            assert_states(ranks[r]["state"], ref, f"rank {r}")
    else:  # per-rank batch norm: rank 0's running statistics are the model's; parameters agree everywhere
        tol = TOLERANCE.get((method, model, strategy), (RTOL, ATOL))
        assert_states(ranks[0]["state"], ref, "rank 0", tol=tol)
        assert_states(ranks[1]["state"], ref, "rank 1", buffers=False, tol=tol)


CUDA_CELLS = [c for c in CELLS if c[2] == "one" and c[3] in ("eager", "ckpt") and not refusals_of(c)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,model,strategy,runtime", [_param(c) for c in CUDA_CELLS])
def test_cell_cuda(method, model, strategy, runtime):
    """The one-process cells on the GPU (cuDNN's float64 kernels), against the CPU reference."""
    assert_states(one_process(method, model, runtime, "cuda"), reference(method, model, strategy), "cuda")


# -- the tables ------------------------------------------------------------------------------------------
def _show(v) -> str:
    return "any" if v == ANY else ", ".join(v) if isinstance(v, tuple) else v


def refusal_table() -> str:
    rows = ["| method | model | strategy | runtime | asked for by | refused with |", "|---|---|---|---|---|---|"]
    for pattern, how, _, message in REFUSALS:
        rows.append("| " + " | ".join(_show(v) for v in pattern) + f" | {how} | `{message}` |")
    return "\n".join(rows)


def test_doc_table_is_the_refusal_list():
    text = open(DOC).read()
    begin, end = "<!-- refusals:begin -->\n", "\n<!-- refusals:end -->"
    assert begin in text and end in text, f"{DOC}: the refusal table's markers are missing"
    table = text[text.index(begin) + len(begin):text.index(end)]
    assert table == refusal_table(), "docs/combinations.md's table differs from REFUSALS; paste refusal_table()"


def test_every_listed_pattern_names_cells():
    for pattern in [r[0] for r in REFUSALS] + list(KNOWN_DEFECTS):
        assert any(_matches(pattern, c) for c in CELLS), pattern
    for cell in TOLERANCE:  # a looser tolerance is for a cell that runs, never for a refused one
        assert any(c[:3] == cell and not refusals_of(c) for c in CELLS), cell


def test_pipeline_float64_model(one_thread):
    """A float64 model in a 2-stage pipeline builds its stages (the worker works around this by
    making float64 the default dtype while it builds them)."""
    res = run_local_group(_build_float64_stage, 2, timeout_s=30)
    assert all(r is not None and r[0] == "ok" for r in res), [r[1] if r else r for r in res]


def test_pipeline_api_refuses_compile_and_checkpointing(one_thread):
    """What the command line refuses (--pipeline with --compile or --checkpoint-global, see
    REFUSALS), the Python API refuses too, with a one-line UserError."""
    res = run_local_group(_stage_of_learner_with, 2, timeout_s=30)
    assert all(r is not None and r[0] == "ok" for r in res), res
    assert res[0][1] == {"compile": "UserError", "ckpt": "UserError"}, res[0][1]


def _stage_of_learner_with(rank, world):
    out = {}
    for runtime in ("compile", "ckpt"):
        net = C.build_model("cifar_resnet", "dgl")
        try:
            build_stage(LocalLearner(net, C.method_of("dgl"), **C.learner_kwargs(runtime)), world,
                        input_shape=(3, C.IMG, C.IMG), timeout_s=20)
            out[runtime] = "accepted"
        except UserError:
            out[runtime] = "UserError"
    return out


def _build_float64_stage(rank, world):
    net = C.build_model("cifar_resnet", "dgl")
    build_stage(LocalLearner(net, C.method_of("dgl"), **C.learner_kwargs("eager")), world,
                input_shape=(3, C.IMG, C.IMG), timeout_s=20)
    return rank
