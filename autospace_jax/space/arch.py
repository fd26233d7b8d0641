"""Macro skeleton and architectures (one genome per layer), with JSON I/O.

The skeleton fixes what NAS does not search: stem width and stride, each
layer's output channels and stride, head width and the number of classes. It is
built from the config's ``model`` section: stage ``s`` has ``blocks[s]`` layers
of width ``widths[s]``; its first layer has stride ``strides[s]``, the rest 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from etils import epath

from autospace_jax.runtime import errors, files
from autospace_jax.space import genome as genome_lib


@dataclasses.dataclass(frozen=True)
class Skeleton:
    stem: int
    stem_stride: int
    layers: tuple[tuple[int, int], ...]  # (c_out, stride) per layer.
    head: int
    num_classes: int

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(tuple(int(v) for v in l) for l in self.layers))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_shapes(self, image_size: int) -> list[tuple[int, int, int, int]]:
        """(input spatial size, c_in, c_out, stride) of every layer for a square input."""
        size = -(-image_size // self.stem_stride)
        c_in, out = self.stem, []
        for c_out, stride in self.layers:
            out.append((size, c_in, c_out, stride))
            size, c_in = -(-size // stride), c_out
        return out

    def head_shape(self, image_size: int) -> tuple[int, int, int]:
        """(H, W, C) of the head's input (the last layer's output) for a square input."""
        size, _, c_out, stride = self.layer_shapes(image_size)[-1]
        return (-(-size // stride),) * 2 + (c_out,)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"layers": [list(l) for l in self.layers]}


def skeleton_from_config(model_config: Any, num_classes: int) -> Skeleton:
    """Expands ``model.widths/blocks/strides`` stages into per-layer (c_out, stride)."""
    widths, blocks, strides = (tuple(model_config[k]) for k in ("widths", "blocks", "strides"))
    if not (len(widths) == len(blocks) == len(strides)):
        raise errors.ConfigError(
            f"model.widths ({len(widths)}), model.blocks ({len(blocks)}) and model.strides "
            f"({len(strides)}) must have one entry per stage"
        )
    layers = []
    for w, n, s in zip(widths, blocks, strides):
        layers += [(w, s)] + [(w, 1)] * (n - 1)
    return Skeleton(
        stem=model_config.stem,
        stem_stride=model_config.stem_stride,
        layers=tuple(layers),
        head=model_config.head,
        num_classes=num_classes,
    )


def check_image_size(skeleton: Skeleton, image_shape: tuple[int, ...]) -> None:
    """Refuses images smaller than the skeleton's total stride: its last layers would
    see nothing but padding."""
    factor = skeleton.stem_stride * math.prod(s for _, s in skeleton.layers)
    if min(image_shape[:2]) < factor:
        raise errors.DataError(
            f"data: images are {image_shape[0]}x{image_shape[1]} but the skeleton downsamples "
            f"them by {factor} (model.stem_stride x model.strides); use images of at least "
            f"{factor}x{factor} (data.image_size) or smaller strides"
        )


def check_layers(skeleton: Skeleton, per_layer: Any) -> None:
    """Raises GenomeError (naming the layer) unless every genome fits its layer."""
    c_in = skeleton.stem
    for l, (genomes, (c_out, stride)) in enumerate(zip(per_layer, skeleton.layers)):
        for g in genomes:
            try:
                genome_lib.check_for_layer(g, stride, c_in, c_out)
            except genome_lib.GenomeError as e:
                raise genome_lib.GenomeError(f"layer {l}: {e}") from None
        c_in = c_out


@dataclasses.dataclass(frozen=True)
class Arch:
    """A network: the skeleton and one genome per layer."""

    skeleton: Skeleton
    genomes: tuple[genome_lib.Genome, ...]

    def __post_init__(self):
        object.__setattr__(self, "genomes", tuple(self.genomes))
        if len(self.genomes) != self.skeleton.num_layers:
            raise genome_lib.GenomeError(
                f"arch has {len(self.genomes)} genomes for a skeleton of "
                f"{self.skeleton.num_layers} layers; accepted: one genome per layer"
            )
        check_layers(self.skeleton, [(g,) for g in self.genomes])


def uniform(skeleton: Skeleton, genome: genome_lib.Genome) -> Arch:
    """The same genome in every layer (e.g. the reference IRB)."""
    return Arch(skeleton, (genome,) * skeleton.num_layers)


def arch_to_json(arch: Arch, **figures: Any) -> dict[str, Any]:
    return {
        "skeleton": arch.skeleton.to_json(),
        "genomes": [g.to_json() for g in arch.genomes],
        **figures,
    }


STRIDES = (1, 2)  # What cells implement (config_checks accepts the same for model.strides).


def skeleton_from_json(obj: Any, where: str) -> Skeleton:
    """Parses :meth:`Skeleton.to_json` output, checking every field's type and range.

    Raises:
      GenomeError: naming ``where``, the field, the bad value and what is accepted.
    """
    fields = [f.name for f in dataclasses.fields(Skeleton)]
    if not isinstance(obj, dict):
        raise genome_lib.GenomeError(
            f"{where}: 'skeleton' is a {type(obj).__name__}; accepted: an object with keys {fields}"
        )
    if set(obj) != set(fields):
        raise genome_lib.GenomeError(
            f"{where}: 'skeleton' has keys {sorted(obj)}; required {fields}"
        )
    for name in ("stem", "head", "num_classes"):
        _check_int(obj[name], f"{where}: skeleton.{name}")
    _check_int(obj["stem_stride"], f"{where}: skeleton.stem_stride", STRIDES)
    layers = obj["layers"]
    if not isinstance(layers, list) or not layers:
        raise genome_lib.GenomeError(
            f"{where}: skeleton.layers is {'[]' if layers == [] else type(layers).__name__}; "
            "accepted: a non-empty list of [c_out, stride] pairs, one per layer"
        )
    for l, layer in enumerate(layers):
        field = f"{where}: skeleton.layers[{l}]"
        if not isinstance(layer, list) or len(layer) != 2:
            raise genome_lib.GenomeError(f"{field}={layer!r}; accepted: a [c_out, stride] pair")
        _check_int(layer[0], f"{field}[0] (c_out)")
        _check_int(layer[1], f"{field}[1] (stride)", STRIDES)
    return Skeleton(**obj)


def _check_int(value: Any, field: str, accepted: tuple[int, ...] | None = None) -> None:
    """An int >= 1 (or one of ``accepted``); JSON's true/false and 8.0 are not ints here."""
    if type(value) is int and (value in accepted if accepted else value >= 1):
        return
    want = f"one of {list(accepted)}" if accepted else "an integer >= 1"
    raise genome_lib.GenomeError(f"{field}={value!r}; accepted: {want}")


def arch_from_json(obj: Any, where: str = "arch.json") -> Arch:
    """Parses :func:`arch_to_json` output; errors name ``where`` and the problem.

    Raises:
      GenomeError: one message naming ``where``, the field and what is accepted.
    """
    if not isinstance(obj, dict) or "skeleton" not in obj or "genomes" not in obj:
        got = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
        raise genome_lib.GenomeError(
            f"{where}: expected an object with 'skeleton' and 'genomes', got {got}"
        )
    skeleton = skeleton_from_json(obj["skeleton"], where)
    genomes = obj["genomes"]
    if not isinstance(genomes, list):
        raise genome_lib.GenomeError(
            f"{where}: 'genomes' must be a list, one genome per layer, got {type(genomes).__name__}"
        )
    parsed = [genome_lib.from_json(g, f"{where}: genomes[{l}]") for l, g in enumerate(genomes)]
    try:
        return Arch(skeleton, tuple(parsed))
    except genome_lib.GenomeError as e:
        raise genome_lib.GenomeError(f"{where}: {e}") from None


def read_json(path: str, kind: str) -> Any:
    """The JSON in ``path`` (local or any etils.epath URL, e.g. gs://).

    Args:
      path: the file.
      kind: what the file is (``"arch"``, ``"space"``), for the messages.

    Raises:
      MissingFileError: the file does not exist.
      GenomeError: it is a directory, not UTF-8 text, or not JSON; the message names it.
    """
    file = epath.Path(path)
    if not file.exists():
        raise errors.MissingFileError(f"{kind} file {path!r} does not exist")
    if file.is_dir():
        raise genome_lib.GenomeError(f"{path}: is a directory; expected a {kind} JSON file")
    try:
        return json.loads(file.read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError.
        raise genome_lib.GenomeError(f"{path}: not valid JSON ({e})") from None


def save_arch(path: str, arch: Arch, **figures: Any) -> None:
    files.write_json(path, arch_to_json(arch, **figures))


def load_arch(path: str) -> Arch:
    """Reads :func:`save_arch` output; errors name the file and the problem."""
    return arch_from_json(read_json(path, "arch"), path)
