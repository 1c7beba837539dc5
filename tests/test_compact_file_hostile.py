"""Compact files and ONNX exports against a hostile user.

A compact file from elsewhere is data, never code, and never a way to make
``load_compact`` allocate what its header declares: each malformed or oversized
file below gets one ``ValueError`` whose first line names the file and the field
at fault and says what to do, before anything it declares is allocated, and the
folder is left as it was. The memory bombs are loaded again in a subprocess whose
address space is capped at 1 GiB above what torch itself maps.

``save_compact`` and ``export_onnx`` refuse, before writing, what could never be
loaded or exported (a gated network, run-time skipping, a wrong model name) and
never replace a file that is not of their kind.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import bbdrop
from bbdrop import export
from bbdrop.compaction import Beside, DependentMask, SelectFeatures, attach_beside_
from bbdrop.models import create_model
from bbdrop.runtime import runtime_pruned

safetensors_torch = pytest.importorskip("safetensors.torch")

NAME = "net.safetensors"
DELETE = object()  # as a value of an edit: remove the field
FIX = r"write it again with bbdrop compact|template="  # what the line must say to do


# -- the files --------------------------------------------------------------------------
def lenet5_compacted() -> nn.Module:
    """LeNet5-Caffe as bbdrop.compact leaves a DBB network, with every kind of layer a
    description holds: convolutions, a DBB mask after conv2, a gather in front of fc1,
    a DBB mask before fc2."""
    torch.manual_seed(0)
    net = create_model("lenet5_caffe", num_classes=10)
    pi = torch.rand(50)
    attach_beside_(net.conv2, Beside(mask=DependentMask(pi, pi, pi, pi, 1e-10, 1e-3),
                                     mask_side="output"))  # fmt: skip
    net.fc1 = nn.Linear(400, 500)
    attach_beside_(net.fc1, Beside(select=SelectFeatures(torch.arange(0, 800, 2), 800, -1)))
    pi = torch.rand(500)
    net.fc2 = nn.Linear(500, 10)
    mask = DependentMask(pi, pi, pi, pi, 1e-10, 1e-3)
    mask.layout = (0, -1)  # a Linear's units: its last dimension
    attach_beside_(net.fc2, Beside(mask=mask))
    return net.eval()


def mlp() -> nn.Module:
    """A network of a user's own, with a batch norm (loaded with a template)."""
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@dataclass(frozen=True)
class Base:
    """A valid compact file: its bytes, description and tensors."""

    data: bytes
    description: dict[str, Any]
    tensors: dict[str, Tensor]


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The safetensors header of ``data`` and the data after it."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _assemble(header: dict[str, Any], rest: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + rest


@pytest.fixture(scope="module")
def bases() -> dict[str, Base]:
    out = {}
    for key, data in (
        ("lenet5", export.compact_bytes(lenet5_compacted(), "lenet5_caffe", 10)),
        ("mlp", export.compact_bytes(mlp(), template=mlp())),
    ):
        header, _ = _header(data)
        description = json.loads(header["__metadata__"]["bbdrop"])
        out[key] = Base(data, description, safetensors_torch.load(data))
    return out


Make = Callable[[Base], bytes]


def edited(*changes: tuple[tuple[Any, ...], Any]) -> Make:
    """The base file with fields of its description set (or removed: DELETE)."""

    def make(base: Base) -> bytes:
        description = copy.deepcopy(base.description)
        for where, value in changes:
            parent = description
            for key in where[:-1]:
                parent = parent[key]
            if value is DELETE:
                del parent[where[-1]]
            else:
                parent[where[-1]] = value
        return described(json.dumps(description))(base)

    return make


def described(text: str) -> Make:
    """The base file's tensors with ``text`` as the description."""
    return lambda base: safetensors_torch.save(base.tensors, metadata={"bbdrop": text})


def stored(change: Callable[[dict[str, Tensor]], None]) -> Make:
    """The base file with its tensors changed (its description as it was)."""

    def make(base: Base) -> bytes:
        tensors = dict(base.tensors)
        change(tensors)
        return safetensors_torch.save(tensors, metadata={"bbdrop": json.dumps(base.description)})

    return make


def header_edited(change: Callable[[dict[str, Any]], None]) -> Make:
    """The base file with its safetensors header changed, its data bytes as they were."""

    def make(base: Base) -> bytes:
        header, rest = _header(base.data)
        change(header)
        return _assemble(header, rest)

    return make


def raw(make: Callable[[bytes], bytes]) -> Make:
    return lambda base: make(base.data)


def _entry(name: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header[name].update(fields)


LINEAR = {"type": "Linear", "in": 6, "out": 6, "bias": True}
NESTED = "[" * 100_000 + "]" * 100_000


@dataclass(frozen=True)
class Hostile:
    id: str
    make: Make
    error: str  # searched in the first line, after the file's name
    base: str = "lenet5"  # "mlp": loaded with its template
    bomb: bool = False  # declares far more than 1 GiB: also loaded under RLIMIT_AS


def bomb(id_: str, make: Make, error: str) -> Hostile:
    return Hostile(f"bomb: {id_}", make, error, bomb=True)


# fmt: off
HOSTILE: list[Hostile] = [
    # the description: malformed fields
    Hostile("model is a string", edited((("model",), "lenet5_caffe"),),
            r"field 'model' must be an object \{name, num_classes\} or null, got 'lenet5_caffe'"),
    Hostile("no num_classes", edited((("model", "num_classes"), DELETE),),
            r"field 'model.num_classes' is missing"),
    Hostile("an unknown model", edited((("model", "name"), "os"),),
            r"field 'model.name' must be one of \[.*'lenet5_caffe'.*\], got 'os'"),
    Hostile("layers is an int", edited((("layers",), 5),),
            r"field 'layers' must be an object, got 5"),
    Hostile("a layer spec is an int", edited((("layers", "conv1"), 5),),
            r"field 'layers.conv1' must be an object, got 5"),
    Hostile("a negative size", edited((("layers", "conv2", "in"), -20),),
            r"field 'layers.conv2.in' must be an integer in \[1, 10\*\*7\], got -20"),
    Hostile("a bool size", edited((("layers", "fc1", "select", "size"), True),),
            r"field 'layers.fc1.select.size' must be an integer in \[1, 10\*\*7\], got True"),
    Hostile("a gather of another width", edited((("layers", "fc1", "select", "size"), 399),),
            r"field 'layers.fc1.select.size' must be 400, the features its Linear reads, got 399"),
    Hostile("a float size", edited((("layers", "conv1", "out"), 20.0),),
            r"field 'layers.conv1.out' must be an integer in \[1, 10\*\*7\], got 20.0"),
    Hostile("an unknown dtype", edited((("dtype",), "float128"),),
            r"field 'dtype' must be one of \['bfloat16', .*\], got 'float128'"),
    Hostile("an unknown layer type", edited((("layers", "conv1", "type"), "os.system"),),
            r"field 'layers.conv1.type' must be one of \[.*'Conv2d'.*\], got 'os.system'"),
    Hostile("a version-1 PrunedLayer in a version-2 file",
            edited((("layers", "fc1"), {"type": "PrunedLayer", "children": [LINEAR]}),),
            r"field 'layers.fc1.type' must be one of \[.*'Linear'.*\], got 'PrunedLayer'"),
    Hostile("a layer for a mask", edited((("layers", "fc2", "mask", "type"), "Linear"),),
            r"field 'layers.fc2.mask.type' must be one of \[.*'DependentMask'.*\], got 'Linear'"),
    Hostile("a mask on no side", edited((("layers", "conv2", "mask", "side"), "both"),),
            r"field 'layers.conv2.mask.side' must be one of \['input', 'output'\], got 'both'"),
    Hostile("a mask without a side", edited((("layers", "fc2", "mask", "side"), DELETE),),
            r"field 'layers.fc2.mask.side' is missing"),
    Hostile("a mask that is a list", edited((("layers", "fc2", "mask"), [1]),),
            r"field 'layers.fc2.mask' must be an object, got \[1\]"),
    Hostile("a gather in front of a batch norm",
            edited((("layers", "1", "select"), {"size": 8, "num_features": 8}),),
            r"field 'layers.1.select' must be absent: a BatchNorm1d reads through no gather",
            base="mlp"),
    Hostile("a mask beside a batch norm, without its side",
            edited((("layers", "1", "mask"), {"type": "DependentMask"}),),
            r"field 'layers.1.mask.side' is missing", base="mlp"),
    Hostile("a missing field", edited((("layers", "conv1", "stride"), DELETE),),
            r"field 'layers.conv1.stride' is missing"),
    Hostile("a kernel_size of one int", edited((("layers", "conv1", "kernel_size"), [5]),),
            r"field 'layers.conv1.kernel_size' must be 2 integers in \[1, 1024\], got \[5\]"),
    Hostile("a kernel_size of text", edited((("layers", "conv1", "kernel_size"), ["5", "5"]),),
            r"field 'layers.conv1.kernel_size' must be 2 integers in \[1, 1024\]"),
    Hostile("a padding_mode torch lacks", edited((("layers", "conv1", "padding_mode"), "os"),),
            r"field 'layers.conv1.padding_mode' must be one of \['circular', 'reflect', "
            r"'replicate', 'zeros'\], got 'os'"),
    Hostile("a padding that is a word", edited((("layers", "conv2", "padding"), "lots"),),
            r"field 'layers.conv2.padding' must be 'same', 'valid' or 2 integers"),
    Hostile("groups that do not divide the channels", edited((("layers", "conv2", "groups"), 3),),
            r"field 'layers.conv2' describes a Conv2d that torch refuses"),
    Hostile("a negative eps", edited((("layers", "fc2", "mask", "eps"), -1.0),),
            r"field 'layers.fc2.mask.eps' must be a finite number in \(0, 1\), got -1.0"),
    Hostile("an eps of NaN", edited((("layers", "fc2", "mask", "eps"), math.nan),),
            r"field 'layers.fc2.mask.eps' must be a finite number in \(0, 1\), got nan"),
    Hostile("an eps of 10**400", edited((("layers", "fc2", "mask", "eps"), 10**400),),
            r"field 'layers.fc2.mask.eps' must be a finite number in \(0, 1\), got 1000"),
    Hostile("an eps that is text", edited((("layers", "fc2", "mask", "eps"), "1e-10"),),
            r"field 'layers.fc2.mask.eps' must be a finite number in \(0, 1\)"),
    Hostile("a batch norm eps of 0", edited((("layers", "1", "eps"), 0),),
            r"field 'layers.1.eps' must be a finite number > 0, got 0", base="mlp"),
    Hostile("a batch norm momentum of 2", edited((("layers", "1", "momentum"), 2),),
            r"field 'layers.1.momentum' must be a finite number in \[0, 1\], got 2", base="mlp"),
    Hostile("a description nested 100,000 deep", described(NESTED),
            r"is not a readable bbdrop compact file: its description is JSON nested too deeply"),
    Hostile("a layer name that is no submodule: os.system",
            edited((("layers", "os.system"), LINEAR),),
            r"field 'layers' names 'os.system', which is not a layer of the network"),
    Hostile("a layer name that is no submodule: __class__",
            edited((("layers", "__class__"), LINEAR),),
            r"field 'layers' names '__class__', which is not a layer of the network"),
    Hostile("a layer of a template that lacks it", edited((("layers", "9"), LINEAR),),
            r"field 'layers' names '9', which is not a layer of the network", base="mlp"),
    Hostile("another format", edited((("format",), "other"),),
            r"is not a bbdrop compact file of version 1 or 2 \(format 'other', version 2\)"),
    Hostile("a later version", edited((("version",), 3),),
            r"is not a bbdrop compact file of version 1 or 2 \(format 'bbdrop-compact', "
            r"version 3\)"),
    Hostile("a version that is true", edited((("version",), True),),
            r"is not a bbdrop compact file of version 1 or 2 \(format 'bbdrop-compact', "
            r"version True\)"),
    Hostile("a description that is a list", described("[]"),
            r"is not a bbdrop compact file of version 1 or 2 \(format \[\], version None\)"),
    Hostile("no description", lambda base: safetensors_torch.save(base.tensors),
            r"is not a bbdrop compact file: its header has no 'bbdrop' description"),
    # the safetensors header
    Hostile("fewer than 8 bytes", raw(lambda data: b"abc"),
            r"is not a readable bbdrop compact file: it has 3 bytes, fewer than"),
    Hostile("a header that is not JSON", raw(lambda data: (5).to_bytes(8, "little") + b"{{{{{"),
            r"is not a readable bbdrop compact file: its header is not JSON"),
    Hostile("a header nested 100,000 deep",
            raw(lambda data: len(NESTED).to_bytes(8, "little") + NESTED.encode()),
            r"is not a readable bbdrop compact file: its header is JSON nested too deeply"),
    Hostile("a tensor of an unknown dtype", header_edited(_entry("conv1.weight", dtype="F128")),
            r"field 'tensors.conv1.weight.dtype' must be one of \['BF16', .*\], got 'F128'"),
    Hostile("a negative dimension", header_edited(_entry("conv1.weight", shape=[-20, 1, 5, 5])),
            r"field 'tensors.conv1.weight.shape' must be a list of integers >= 0"),
    Hostile("tensors that overlap", header_edited(
                lambda h: h.update({"evil": h["conv1.bias"]})),
            r"is not a readable bbdrop compact file: its tensors leave a gap or overlap"),
    Hostile("a file cut short", raw(lambda data: data[:-100]),
            r"is not a readable bbdrop compact file: field 'tensors\..*\.data_offsets' must be "
            r"\[begin, end\] within its \d+ bytes of data"),
    # the stored tensors against the described network
    Hostile("a tensor of another shape",
            stored(lambda t: t.update({"conv1.bias": torch.zeros(21)})),
            r"layer 'conv1' expects bias of shape \(20,\), the file stores \(21,\): the file does "
            r"not fit the network it is loaded into"),
    Hostile("a tensor of another dtype",
            stored(lambda t: t.update({"conv1.weight": t["conv1.weight"].double()})),
            r"layer 'conv1' expects weight of dtype torch.float32, the file stores torch.float64"),
    Hostile("a missing tensor", stored(lambda t: t.pop("conv1.bias")),
            r"layer 'conv1' expects bias of shape \(20,\), the file stores none"),
    Hostile("a tensor with no place", stored(lambda t: t.update({"os.system": torch.zeros(1)})),
            r"the file stores 'os.system', which the network has no place for"),
    Hostile("gather indices out of range",
            stored(lambda t: t.update({"fc1.select.index": torch.arange(400) + 1000})),
            r"field 'tensors.fc1.select.index' must be increasing indices in \[0, 800\), got "
            r"\[1000,"),
    # memory bombs: a few KB to 1 MB that declare gigabytes (or more)
    bomb("a Linear of 30000 x 30000", edited(
            (("layers", "fc2", "in"), 30000),
            (("layers", "fc2", "out"), 30000)),
         r"layer 'fc2' expects weight of shape \(30000, 30000\), the file stores \(10, 500\)"),
    bomb("a DependentMask of 3e8 units",
         edited((("layers", "fc2", "mask", "units"), 3 * 10**8),),
         r"field 'layers.fc2.mask.units' must be an integer in \[1, 10\*\*7\], "
         r"got 300000000"),
    bomb("a DependentMask of 10**7 units",
         edited((("layers", "fc2", "mask", "units"), 10**7),),
         r"layer 'fc2.mask' expects pi of shape \(10000000,\), the file stores \(500,\)"),
    bomb("num_classes 1e8", edited((("model", "num_classes"), 10**8),),
         r"field 'model.num_classes' must be an integer in \[2, 10\*\*7\], got 100000000"),
    bomb("num_classes 10**7 (a 20 GB create_model)",
         edited((("model", "num_classes"), 10**7), (("layers", "fc2"), DELETE)),
         r"layer 'fc2' expects weight of shape \(10000000, 500\), the file stores \(10, 500\)"),
    bomb("a Conv2d of 10**7 channels and 1024x1024 kernels", edited(
            (("layers", "conv2", "out"), 10**7),
            (("layers", "conv2", "kernel_size"), [1024, 1024])),
         r"layer 'conv2' expects weight of shape \(10000000, 20, 1024, 1024\), the file stores "
         r"\(50, 20, 5, 5\)"),
    bomb("a size of 1e30", edited((("layers", "conv1", "out"), 1e30),),
         r"field 'layers.conv1.out' must be an integer in \[1, 10\*\*7\], got 1e\+30"),
    bomb("a header length of 2**40",
         raw(lambda data: (2**40).to_bytes(8, "little") + data[8:]),
         r"is not a readable bbdrop compact file: its header length 1099511627776 is not in"),
    bomb("a tensor of 10**12 values in 80 bytes",
         header_edited(_entry("conv1.bias", shape=[10**6, 10**6])),
         r"field 'tensors.conv1.bias.data_offsets' must be 4000000000000 bytes apart"),
]
# fmt: on
BOMBS = [h for h in HOSTILE if h.bomb]


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``folder`` (and the folder): its mtime and, for a file, its bytes."""
    paths = [folder, *folder.rglob("*")]
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in paths
    }


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0]


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.id for h in HOSTILE])
def test_a_hostile_compact_file_gets_one_line_naming_the_file_and_the_field(
    hostile: Hostile, bases: dict[str, Base], tmp_path: Path
) -> None:
    path = tmp_path / NAME
    path.write_bytes(hostile.make(bases[hostile.base]))
    before = _snapshot(tmp_path)
    template = mlp() if hostile.base == "mlp" else None
    with pytest.raises(ValueError) as caught:
        bbdrop.load_compact(path, template=template)
    line = _first_line(caught.value)
    assert "\n" not in str(caught.value)
    assert line.startswith(str(path)), line
    assert re.search(hostile.error, line), line
    assert re.search(FIX, line), line
    assert _snapshot(tmp_path) == before


def test_the_base_files_load(bases: dict[str, Base], tmp_path: Path) -> None:
    """The files the hostile ones are made from load, and compute what was saved."""
    (tmp_path / "a.safetensors").write_bytes(bases["lenet5"].data)
    (tmp_path / "b.safetensors").write_bytes(bases["mlp"].data)
    x = torch.randn(3, 1, 28, 28)
    loaded = bbdrop.load_compact(tmp_path / "a.safetensors")
    torch.testing.assert_close(loaded(x), lenet5_compacted()(x), rtol=0, atol=0)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    torch.manual_seed(1)
    source = mlp().eval()
    path = bbdrop.save_compact(source, tmp_path / "c.safetensors", template=mlp())
    loaded = bbdrop.load_compact(path, template=mlp())
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


# The memory bombs in a process that cannot map more than 1 GiB beyond what it has once
# torch and bbdrop are imported: the import itself maps several hundred MB of address
# space (shared libraries, thread stacks, allocator arenas), which a flat limit would
# have to guess. Each load must fail with its ValueError, not with MemoryError.
RLIMIT_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import torch, bbdrop

    def vm_size() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmSize")

    torch.set_num_threads(1)  # no thread pool (and its arenas) appearing under the limit
    limit = vm_size() + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for path in sys.argv[1:]:
        start = time.perf_counter()
        try:
            bbdrop.load_compact(path)
            line = "loaded"
        except ValueError as err:
            line = str(err).splitlines()[0]
        print(json.dumps({"path": path, "line": line, "seconds": time.perf_counter() - start,
                          "vm_over_limit": vm_size() - limit,
                          "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_memory_bombs_fail_fast_in_a_process_capped_at_1_gib(
    bases: dict[str, Base], tmp_path: Path
) -> None:
    paths = []
    for i, hostile in enumerate(BOMBS):
        paths.append(tmp_path / f"bomb{i}.safetensors")
        paths[-1].write_bytes(hostile.make(bases[hostile.base]))
    done = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, *map(str, paths)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(BOMBS)
    for hostile, result in zip(BOMBS, results, strict=True):
        assert re.search(hostile.error, result["line"]), (hostile.id, result["line"])
        assert result["seconds"] < 5, (hostile.id, result["seconds"])
        assert result["vm_over_limit"] < 0


# -- writing ------------------------------------------------------------------------------
def _refused(call: Callable[[], Any], error: str, folder: Path) -> str:
    """The first line of the ValueError ``call`` raises; nothing in ``folder`` changed."""
    before = _snapshot(folder)
    with pytest.raises(ValueError) as caught:
        call()
    line = _first_line(caught.value)
    assert re.search(error, line), line
    assert "\n" not in str(caught.value) and ".part" not in line
    assert _snapshot(folder) == before
    return line


def test_save_compact_refuses_networks_that_could_never_load(tmp_path: Path) -> None:
    small = lenet5_compacted()
    path = tmp_path / NAME
    gated = bbdrop.attach_gates_(create_model("lenet_500_300", num_classes=10), "bb")
    _refused(lambda: bbdrop.save_compact(gated, path, "lenet_500_300", 10),
             r"still has bbdrop gates \(at 'fc1', 'fc2', 'fc3'\); save the compacted network "
             r"instead: small = bbdrop.compact\(net, example\)", tmp_path)  # fmt: skip
    skipping = runtime_pruned(small, torch.randn(2, 1, 28, 28))
    _refused(lambda: bbdrop.save_compact(skipping, path, "lenet5_caffe", 10),
             r"skips switched-off units at run time .*SkipZeroInputs at 'fc1', 'fc2'.*save the "
             r"compacted network", tmp_path)  # fmt: skip
    _refused(
        lambda: bbdrop.save_compact(small, path, "lenet9", 10),
        r"unknown model 'lenet9'; bbdrop's models are \[.*\]",
        tmp_path,
    )
    _refused(lambda: bbdrop.save_compact(small, path, "lenet_500_300", 10),
             r"the network is not a compacted bbdrop 'lenet_500_300' with 10 classes: field "
             r"'layers' names 'conv1', which is not a layer of the network; pass the model "
             r"name", tmp_path)  # fmt: skip
    _refused(
        lambda: bbdrop.save_compact(small, path, "lenet5_caffe"),
        r"model_name 'lenet5_caffe' needs num_classes",
        tmp_path,
    )
    _refused(
        lambda: bbdrop.save_compact(small, path, num_classes=10),
        r"num_classes=10 without a model_name",
        tmp_path,
    )
    _refused(
        lambda: bbdrop.save_compact(mlp(), path, template=nn.Sequential(nn.Linear(6, 3))),
        r"the network does not fit the template: field 'layers' names '1'",
        tmp_path,
    )
    assert not list(tmp_path.iterdir())


def test_save_compact_refuses_paths_it_must_not_write(tmp_path: Path) -> None:
    small = lenet5_compacted()
    _refused(
        lambda: bbdrop.save_compact(small, tmp_path / "bb.pt", "lenet5_caffe", 10),
        r"bb.pt: a compact file ends in .safetensors, got 'bb.pt'",
        tmp_path,
    )
    (tmp_path / "dir.safetensors").mkdir()
    _refused(
        lambda: bbdrop.save_compact(small, tmp_path / "dir.safetensors", "lenet5_caffe", 10),
        r"dir.safetensors is a folder; give the path of a file in it",
        tmp_path,
    )
    (tmp_path / "notes.safetensors").write_text("my notes")
    (tmp_path / "plain.safetensors").write_bytes(safetensors_torch.save({"w": torch.zeros(2)}))
    for name in ("notes.safetensors", "plain.safetensors"):
        _refused(lambda n=name: bbdrop.save_compact(small, tmp_path / n, "lenet5_caffe", 10),
                 rf"{name} exists and is not a bbdrop compact file; choose another path or "
                 r"delete it", tmp_path)  # fmt: skip
    (tmp_path / "afile").write_text("x")
    _refused(
        lambda: bbdrop.save_compact(small, tmp_path / "afile" / NAME, "lenet5_caffe", 10),
        r"cannot write .*afile/net.safetensors: .*afile is a file, not a folder",
        tmp_path,
    )
    # a compact file is replaced; the check says why before anything is written
    ours = bbdrop.save_compact(small, tmp_path / NAME, "lenet5_caffe", 10)
    assert bbdrop.save_compact(mlp(), ours, template=mlp()) == ours
    with pytest.raises(ValueError, match=r"saved without a bbdrop model name"):
        bbdrop.load_compact(ours)


def test_compact_bytes_without_name_or_template_checks_what_it_can() -> None:
    data = export.compact_bytes(mlp())
    header, _ = _header(data)
    assert json.loads(header["__metadata__"]["bbdrop"])["model"] is None
    with pytest.raises(ValueError, match=r"the network is itself one layer \(Linear\)"):
        export.compact_bytes(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"model must be an nn.Module, got 'net'"):
        export.compact_bytes("net")  # type: ignore[arg-type]


# -- ONNX -------------------------------------------------------------------------------
class DataDependent(nn.Module):
    """A branch on the values of the input: torch.export cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2 if x.sum() > 0 else x


@pytest.fixture
def no_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's exporter, if called, fails the test: refusals come before it."""

    def called(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.onnx.export was called")

    monkeypatch.setattr(torch.onnx, "export", called)


def test_export_onnx_refuses_gates_and_runtime_skipping_before_the_exporter(
    tmp_path: Path, no_exporter: None
) -> None:
    pytest.importorskip("onnxscript")
    gated = bbdrop.attach_gates_(create_model("lenet_500_300", num_classes=10), "bb")
    x = torch.randn(2, 1, 28, 28)
    _refused(lambda: bbdrop.export_onnx(gated, x, tmp_path / "net.onnx"),
             r"still has bbdrop gates \(at 'fc1', 'fc2', 'fc3'\); export the compacted network "
             r"instead: small = bbdrop.compact\(net, example\)", tmp_path)  # fmt: skip
    skipping = runtime_pruned(lenet5_compacted(), x)
    _refused(lambda: bbdrop.export_onnx(skipping, x, tmp_path / "net.onnx"),
             r"SkipZeroInputs at 'fc1', 'fc2'\), data-dependent control flow that ONNX cannot "
             r"hold; export the compacted network from bbdrop.compact\(net, example\), whose DBB "
             r"masks are kept", tmp_path)  # fmt: skip


def test_export_onnx_refuses_paths_it_must_not_write(tmp_path: Path, no_exporter: None) -> None:
    pytest.importorskip("onnxscript")
    small, x = lenet5_compacted(), torch.randn(2, 1, 28, 28)
    (tmp_path / "bb.pt").write_bytes(b"a checkpoint")
    _refused(
        lambda: bbdrop.export_onnx(small, x, tmp_path / "bb.pt"),
        r"bb.pt: an ONNX file ends in .onnx, got 'bb.pt'",
        tmp_path,
    )
    (tmp_path / "x.onnx").write_text("some text, not a model\n")
    _refused(
        lambda: bbdrop.export_onnx(small, x, tmp_path / "x.onnx"),
        r"x.onnx exists and is not an ONNX model; choose another path or delete it",
        tmp_path,
    )
    (tmp_path / "empty.onnx").write_bytes(b"")  # parses as an empty ModelProto
    _refused(
        lambda: bbdrop.export_onnx(small, x, tmp_path / "empty.onnx"),
        r"empty.onnx exists and is not an ONNX model",
        tmp_path,
    )
    (tmp_path / "dir.onnx").mkdir()
    _refused(
        lambda: bbdrop.export_onnx(small, x, tmp_path / "dir.onnx"),
        r"dir.onnx is a folder",
        tmp_path,
    )


def test_an_existing_onnx_model_is_recognised(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    graph = onnx.helper.make_graph([], "g", [], [])
    (tmp_path / "old.onnx").write_bytes(onnx.helper.make_model(graph).SerializeToString())
    assert export.check_onnx_path(tmp_path / "old.onnx") == tmp_path / "old.onnx"


@pytest.mark.slow
def test_a_failing_exporter_gives_one_line_and_a_quiet_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxscript")
    capfd.readouterr()
    _refused(lambda: bbdrop.export_onnx(DataDependent(), torch.randn(2, 4), tmp_path / "n.onnx"),
             r"torch's ONNX exporter cannot export this network \(\w+: Could not guard on "
             r"data-dependent expression", tmp_path)  # fmt: skip
    out, err = capfd.readouterr()
    assert len(err.splitlines()) < 5, err
    assert len(out.splitlines()) < 5, out
    assert logging_levels_restored()


def logging_levels_restored() -> bool:
    import logging

    return logging.getLogger("torch.onnx").level != logging.CRITICAL + 1


def test_missing_extras_are_found_before_anything_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export.check_export_extras(onnx=False)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    export.check_export_extras(onnx=False)  # safetensors alone is there
    with pytest.raises(
        ImportError, match=r"onnxscript is missing; .*pip install 'bbdrop\[export\]'"
    ):
        export.check_export_extras(onnx=True)
    with pytest.raises(ImportError, match=r"onnxscript is missing"):
        bbdrop.export_onnx(lenet5_compacted(), torch.randn(2, 1, 28, 28), tmp_path / "n.onnx")
    assert not list(tmp_path.iterdir())
