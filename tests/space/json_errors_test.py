"""Malformed or hand-edited arch.json / space.json / genome JSON: one clear error.

Every case starts from a file the library's own writers produce (``save_arch``;
a space laid out as ``evolution_report.space_json`` writes it) and corrupts
one field. The error must be a GenomeError that names the file, the field and,
where there is a fixed set, what is accepted: never a KeyError or TypeError
from deep inside.
"""

import copy
import json
import logging

import pytest

from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from autospace_jax.space import spaces

# Layer 0 has a residual (skip allowed), layer 1 is strided (skip invalid).
SKELETON = arch_lib.Skeleton(8, 1, ((8, 1), (16, 2)), 16, 10)
ARCH = arch_lib.Arch(SKELETON, (g.irb(3, 6), g.irb(3, 3)))
SPACE_LAYERS = ((g.irb(3, 6), g.irb(3, 3), g.SKIP), (g.irb(3, 6), g.irb(3, 3)))

DROP = object()  # _set(..., value=DROP) deletes the key instead.
# Node 4 is unreachable although two edges are not zero: a skip cell in disguise.
DEAD_END = g.Genome(("conv1x1", "zero", "zero", "conv3x3", "zero", "zero")).to_json()["edges"]
# The IRB's edges with the key "1-4" mistyped as "1-9".
EDGES_1_9 = {("1-9" if k == "1-4" else k): op for k, op in g.irb().to_json()["edges"].items()}


def _arch_json():
    return arch_lib.arch_to_json(ARCH, madds=123, params=45)


def _space_json():
    """The layout evolution_report.space_json writes (figures are not read back)."""
    layers = [
        [{"genome": x.to_json(), "id": x.id, "alpha": 0.5, "madds": 7, "params": 3} for x in layer]
        for layer in SPACE_LAYERS
    ]
    skeleton = SKELETON.to_json()
    return {"skeleton": skeleton, "palette": "paper", "layers": layers, "config": {"seed": 0}}


def _set(*keys, value):
    """A corruption: sets (or with DROP deletes) ``obj[k0][k1]...`` to ``value``."""

    def corrupt(obj):
        for key in keys[:-1]:
            obj = obj[key]
        if value is DROP:
            del obj[keys[-1]]
        else:
            obj[keys[-1]] = copy.deepcopy(value)

    return corrupt


def _write(tmp_path, name, valid, corrupt):
    """Writes ``valid()`` corrupted by ``corrupt`` (or raw text/bytes) to tmp_path/name."""
    path = tmp_path / name
    if isinstance(corrupt, bytes):
        path.write_bytes(corrupt)
    elif isinstance(corrupt, str):
        path.write_text(corrupt)
    else:
        obj = valid()
        corrupt(obj)
        path.write_text(json.dumps(obj))
    return str(path)


def test_valid_files_load(tmp_path):
    """The uncorrupted files load, so in every case below the corruption is the cause."""
    path = str(tmp_path / "arch.json")
    arch_lib.save_arch(path, ARCH, madds=1, params=2)
    assert arch_lib.load_arch(path) == ARCH
    space = spaces.load_space(_write(tmp_path, "space.json", _space_json, lambda obj: None))
    assert space.skeleton == SKELETON and space.candidates == SPACE_LAYERS


# Corruptions shared by arch.json (genome 1) and space.json (layer 1, candidate 0): the
# genome JSON and the skeleton. `where` is filled in per file kind.
GENOME_CASES = [
    ("unknown op", ("edges", "1-4"), "maxpool", r"{where}: edge 1-4 has op 'maxpool'; accepted"),
    ("op not a string", ("edges", "1-4"), ["dwconv3x3"], r"edge 1-4 has op \['dwconv3x3'\]"),
    ("op null", ("edges", "2-3"), None, r"edge 2-3 has op None; accepted"),
    ("edge key 1-9", ("edges",), EDGES_1_9,
     r"{where}: 'edges' .*missing \['1-4'\], unknown \['1-9'\]\); required exactly"),
    ("edge key a-b", ("edges", "a-b"), "zero", r"unknown \['a-b'\]"),
    ("edge missing", ("edges", "3-4"), DROP, r"missing \['3-4'\], unknown \[\]"),
    ("edges a list", ("edges",), ["zero"] * 6, r"{where}: 'edges' must be an object .*got list"),
    ("expansion 4", ("expansion",), 4, r"{where}: expansion=4; accepted: \[1, 3, 6\]"),
    ("expansion a string", ("expansion",), "6", r"expansion='6'; accepted: \[1, 3, 6\]"),
    ("expansion a float", ("expansion",), 6.0, r"expansion=6.0; accepted"),
    ("expansion a bool", ("expansion",), True, r"expansion=True; accepted"),
    ("aggregation", ("aggregation",), "concat", r"aggregation='concat'; accepted: \['add', 'mul"),
    ("aggregation a list", ("aggregation",), ["add"], r"aggregation=\['add'\]; accepted"),
    ("unknown genome key", ("kernel",), 3, r"{where}: keys .*'kernel'.*required 'edges'"),
    ("no edges key", ("edges",), DROP, r"{where}: keys \['aggregation', 'expansion'\]; required"),
    ("skip cell in a strided layer", ("edges",), g.SKIP.to_json()["edges"],
     r"layer 1: genome .*skip cell .*stride=2.*valid only where stride == 1"),
    ("node 4 unreachable in a strided layer", ("edges",), DEAD_END, r"layer 1: .*skip cell"),
]  # fmt: skip

SKELETON_CASES = [
    ("skeleton a list", (), [8, 1], r"'skeleton' is a list; accepted: an object with keys"),
    ("skeleton key missing", ("head",), DROP, r"'skeleton' has keys .*; required \['stem', "),
    ("skeleton key extra", ("depth",), 3, r"'skeleton' has keys \['depth', .*; required"),
    ("stem a string", ("stem",), "8", r"skeleton.stem='8'; accepted: an integer >= 1"),
    ("head zero", ("head",), 0, r"skeleton.head=0; accepted: an integer >= 1"),
    ("num_classes a bool", ("num_classes",), True, r"skeleton.num_classes=True; accepted"),
    ("stem_stride 3", ("stem_stride",), 3, r"skeleton.stem_stride=3; accepted: one of \[1, 2\]"),
    ("layers a string", ("layers",), "8,1;16,2", r"skeleton.layers is str; accepted: a non-empty"),
    ("layers empty", ("layers",), [], r"skeleton.layers is \[\]; accepted: a non-empty list"),
    ("layer not a pair", ("layers", 1), [16], r"skeleton.layers\[1\]=\[16\]; accepted: a \[c_out"),
    ("layer stride 3", ("layers", 1, 1), 3, r"layers\[1\]\[1\] \(stride\)=3; accepted: one of"),
    ("layer stride a string", ("layers", 1, 1), "2", r"\(stride\)='2'; accepted: one of \[1, 2\]"),
    ("layer width a float", ("layers", 0, 0), 8.5, r"layers\[0\]\[0\] \(c_out\)=8.5; accepted"),
]  # fmt: skip


def _cases(file_cases, genome_at, skeleton_at, where):
    """File-specific cases plus the shared genome and skeleton corruptions, re-rooted."""
    out = [pytest.param(c, m, id=name) for name, c, m in file_cases]
    for name, keys, value, message in GENOME_CASES:
        corrupt = _set(*genome_at, *keys, value=value)
        out.append(pytest.param(corrupt, message.format(where=where), id=f"genome: {name}"))
    for name, keys, value, message in SKELETON_CASES:
        corrupt = _set(*skeleton_at, *keys, value=value)
        out.append(pytest.param(corrupt, message, id=f"skeleton: {name}"))
    return out


ARCH_CASES = [
    ("not JSON", "{not json", r"not valid JSON"),
    ("empty file", "", r"not valid JSON"),
    ("not UTF-8", b"\xff\xfe{}", r"not valid JSON"),
    ("top level a list", "[]", r"expected an object with 'skeleton' and 'genomes', got list"),
    ("no genomes", _set("genomes", value=DROP), r"got keys \['madds', 'params', 'skeleton'\]"),
    ("genomes a dict", _set("genomes", value={"0": {}}), r"'genomes' must be a list, .*got dict"),
    ("genome a string", _set("genomes", 0, value="irb"),
     r"genomes\[0\]: expected an object .*got str"),
    ("too few genomes", _set("genomes", 1, value=DROP), r"1 genomes for a skeleton of 2 layers"),
    ("too many genomes", _set("genomes", value=[g.irb().to_json()] * 3),
     r"3 genomes for a skeleton of 2 layers"),
]  # fmt: skip

SPACE_CASES = [
    ("not JSON", '{"skeleton": ', r"not valid JSON"),
    ("top level a list", "[[]]", r"expected an object with 'skeleton' and 'layers', got list"),
    ("no layers", _set("layers", value=DROP), r"got keys \['config', 'palette', 'skeleton'\]"),
    ("layers a dict", _set("layers", value={"0": []}),
     r"'layers' is a dict; accepted: a list of candidate lists"),
    ("too few layers", _set("layers", 1, value=DROP),
     r"'layers' has 1 entries for a skeleton of 2 layers"),
    ("layer empty", _set("layers", 1, value=[]),
     r"layers\[1\] is empty; accepted: a non-empty list of \{'genome': ...\} candidates"),
    ("layer a single candidate", _set("layers", 0, value={"genome": g.irb().to_json()}),
     r"layers\[0\] is a dict; accepted: a non-empty list"),
    ("bare genome, no 'genome' key", _set("layers", 0, 1, value=g.irb(3, 3).to_json()),
     r"layers\[0\]\[1\]: expected an object with a 'genome' key, got keys \['aggregation'"),
    ("candidate a string", _set("layers", 0, 1, value="irb"), r"layers\[0\]\[1\]: .*got str"),
    ("genome null", _set("layers", 0, 1, "genome", value=None),
     r"layers\[0\]\[1\].genome: expected an object .*got NoneType"),
    ("duplicated candidate", _set("layers", 0, 2, value={"genome": g.irb(3, 6).to_json()}),
     r"layers\[0\]\[2\] repeats layers\[0\]\[0\] \(r6/add\[14:dwconv3x3\]\); .*distinct"),
    ("unknown palette", _set("palette", value="big"),
     r"palette='big'; accepted: \['default', 'paper'\] or no 'palette'"),
    ("op outside the palette", _set("layers", 1, 0, "genome", "edges", "1-4", value="dwconv5x5"),
     r"layers\[1\]\[0\].genome: edge 1-4 has op 'dwconv5x5'; accepted in palette 'paper'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "corrupt, message", _cases(ARCH_CASES, ("genomes", 1), ("skeleton",), r"genomes\[1\]")
)
def test_arch_json_errors_name_the_file_and_field(tmp_path, corrupt, message):
    path = _write(tmp_path, "arch.json", _arch_json, corrupt)
    with pytest.raises(g.GenomeError, match=message) as info:
        arch_lib.load_arch(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "corrupt, message",
    _cases(SPACE_CASES, ("layers", 1, 0, "genome"), ("skeleton",), r"layers\[1\]\[0\].genome"),
)
def test_space_json_errors_name_the_file_and_field(tmp_path, corrupt, message):
    path = _write(tmp_path, "space.json", _space_json, corrupt)
    with pytest.raises(g.GenomeError, match=message) as info:
        spaces.load_space(path)
    assert str(info.value).startswith(f"{path}: ")


def test_space_without_palette_allows_any_op(tmp_path):
    """'palette' is optional; without it any op of the default palette is fine."""
    corrupt = _set("layers", 1, 0, "genome", "edges", "1-4", value="dwconv5x5")
    obj = _space_json()
    corrupt(obj)
    del obj["palette"]
    path = tmp_path / "space.json"
    path.write_text(json.dumps(obj))
    assert spaces.load_space(str(path)).candidates[1][0] == g.irb(5, 6)


@pytest.mark.parametrize("load", [arch_lib.load_arch, spaces.load_space])
def test_missing_file_and_directory(tmp_path, load):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=f"{missing!r} does not exist"):
        load(missing)
    with pytest.raises(g.GenomeError, match=f"{tmp_path}: is a directory; expected a"):
        load(str(tmp_path))


def test_resolve_checks_classes_and_warns_on_another_skeleton(tmp_path, caplog):
    path = _write(tmp_path, "space.json", _space_json, lambda obj: None)
    other_classes = arch_lib.Skeleton(8, 1, SKELETON.layers, 16, 100)
    with pytest.raises(g.GenomeError, match=f"{path}: skeleton.num_classes=10 .* 100 classes"):
        spaces.resolve(path, str(tmp_path), other_classes)
    deeper = arch_lib.Skeleton(8, 1, SKELETON.layers + ((16, 1),), 16, 10)
    with caplog.at_level(logging.WARNING):
        space, source = spaces.resolve(path, str(tmp_path), deeper)
    assert space.skeleton == SKELETON and source == path
    assert "its skeleton (2 layers) differs from config.model (3 layers)" in caplog.text


def test_cli_malformed_arch_is_one_fatal_line(tmp_path):
    """From the command line the same error ends the run in one line, not a traceback."""
    from tests import runner  # noqa: PLC0415 (only this test starts a subprocess)

    obj = _arch_json()
    obj["genomes"][1]["edges"]["1-4"] = "maxpool"
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(obj))
    proc = runner.run(
        runner.command(str(tmp_path / "run"), "--mode=train", f"--config.train.arch={path}")
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"FATAL GenomeError: {path}: genomes[1]: edge 1-4 has op 'maxpool'")
    assert "Traceback" not in proc.stderr
