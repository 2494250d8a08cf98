"""Load a model from the local cache: the same code for real and tiny models.

Loading never touches the network: everything is read from a snapshot folder with
`local_files_only=True`. Only when the snapshot is missing and the caller allows it
(`allow_download`, False under HF_HUB_OFFLINE=1) is the model pulled first, the seed's
zero-config path.

Two cold-start switches (the same weights either way; see image/operations/tuning.py):

- `read_ahead`: threads read every weight file of the snapshot into the page cache, one per
  file, and start CUDA, while the main thread builds the model classes. The libraries build
  components one after another on purpose: diffusers and transformers change process-wide
  state while they build (the default dtype, `torch.nn.init`, accelerate's meta-device
  patch), so building two at once in threads is not safe; reading files is.
- `direct_to_device`: `device_map` puts each tensor on the GPU as it is read from the
  safetensors file (no full copy in host memory, no random initialisation, no `.to()`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import threading
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from image.device import device_failure, out_of_memory
from image.errors import ModelError, ModelMissing
from image.models import store
from image.models._quiet import quiet_libraries
from image.models.lock import Lock
from image.models.readahead import read_ahead, weight_files
from image.models.registry import DIFFUSERS, RMBG, ModelSpec

logger = logging.getLogger("imagen.models")


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run. `model_id` is "repo@commit" ("repo@commit+tiny" for a tiny model);
    `seconds` is the load time."""

    model: object
    model_id: str
    revision: str
    tiny: bool
    seconds: float


def load_model(
    spec: ModelSpec,
    cache_dir: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    allow_download: bool,
    lock: Lock | None = None,
    read_ahead: bool = False,
    direct_to_device: bool = False,
) -> LoadedModel:
    """Load `spec` from `cache_dir` onto `device` in `dtype`.

    `lock` defaults to the lock shipped with the code. Raises ModelMissing (naming
    `imagen models pull`) when the model is absent or incomplete and may not be pulled.
    `read_ahead` and `direct_to_device` are the cold-start switches of the module docstring.
    """
    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    lock = Lock.packaged() if lock is None else lock
    if spec.loader not in _LOADERS:
        raise ModelError(f"{spec.operation}: unknown loader {spec.loader!r}")
    problems = store.spec_problems(spec, cache_dir, lock, formats=False)
    _, found = store.find_snapshot(spec, cache_dir, lock)
    # A broken tiny model is repaired by rebuilding it, not by downloading the real one.
    if problems and allow_download and (found is None or not store.is_tiny(found)):
        logger.info("%s: model %s not in %s; pulling it now", spec.operation, spec.repo_id, cache_dir)
        try:
            store.fetch(spec, cache_dir, lock=lock)
        except ModelError as error:
            missing = _missing(spec, problems, cache_dir, lock, found)
            raise ModelMissing(f"{missing}; pulling it now failed: {error}") from error
        problems = store.spec_problems(spec, cache_dir, lock, formats=False)
    if problems:
        raise ModelMissing(_missing(spec, problems, cache_dir, lock, found))
    snapshot = store.resolve_snapshot(spec, cache_dir, lock=lock)
    tiny = store.is_tiny(snapshot)
    # A tiny model built at the lock's commit carries the real one's: marked, so neither an
    # output's imagen-model nor a compile artefact's name passes random weights for real ones.
    model_id = f"{spec.repo_id}@{snapshot.name}" + ("+tiny" if tiny else "")
    logger.info("%s: loading %s%s from %s", spec.operation, model_id, " (tiny)" if tiny else "", cache_dir)
    if read_ahead:
        start_read_ahead(snapshot, device)
    try:
        with quiet_libraries(_LIBRARIES[spec.loader]):
            model = _LOADERS[spec.loader](
                spec, snapshot, device=device, dtype=dtype, direct_to_device=direct_to_device
            )
    except Exception as error:
        # What a damaged or unreadable model raises, and tokenizers' plain Exception (a cut
        # merges.txt); anything else (the GPU out of memory or failed, MemoryError, an
        # ImportError of the image, a bug) as it is.
        if (not isinstance(error, _LOAD_ERRORS) and type(error) is not Exception) or out_of_memory(error) \
                or device_failure(error):  # the GPU's, not the model's
            raise
        raise ModelError(
            f"{spec.operation}: loading {model_id} from {snapshot} failed: "
            f"{type(error).__name__}: {_first_line(error)}; check it with `imagen models verify`"
        ) from error
    seconds = time.perf_counter() - started
    logger.info("%s: loaded %s on %s (%s) in %.1f s", spec.operation, model_id, device, dtype, seconds)
    return LoadedModel(model, model_id, snapshot.name, tiny, seconds)


def _missing(spec: ModelSpec, problems: list[str], cache_dir: Path, lock: Lock, found: Path | None) -> str:
    if len(problems) == 1 and "is not in the model cache" in problems[0]:
        return problems[0]
    tiny = found is not None and store.is_tiny(found)  # rebuilt, not downloaded (a gated repo, offline)
    return "; ".join(problems) + f"; run `{store.pull_command([spec], cache_dir, lock, tiny=tiny)}`"


def start_read_ahead(snapshot: Path, device: torch.device) -> list[threading.Thread]:
    """Read the snapshot's weight files into the page cache in background threads (one per
    file, each file once per process: image/models/readahead.py), and initialise CUDA in
    another when `device` is a GPU. Nothing waits for them."""
    threads = read_ahead(weight_files(snapshot))
    if torch.device(device).type == "cuda":
        cuda = threading.Thread(target=_init_cuda, daemon=True)
        cuda.start()
        threads.append(cuda)
    return threads


def _init_cuda() -> None:
    try:
        torch.cuda.init()
    except RuntimeError as error:
        logger.debug("CUDA initialisation in the background failed: %s", error)


def _device_map(device: torch.device) -> str | None:
    """The `device_map` diffusers accepts for `device` ("cuda"), or None where it has none."""
    device = torch.device(device)
    if device.type != "cuda" or (device.index not in (None, torch.cuda.current_device())):
        return None
    return "cuda"


def _load_pipeline(
    spec: ModelSpec, snapshot: Path, *, device: torch.device, dtype: torch.dtype, direct_to_device: bool = False
):
    import diffusers

    pipeline_class = getattr(diffusers, spec.pipeline)
    kwargs: dict = {name: None for name in spec.disabled}
    if "safety_checker" in spec.disabled and "requires_safety_checker" in inspect.signature(pipeline_class).parameters:
        kwargs["requires_safety_checker"] = False
    weights = [path.name for path in snapshot.rglob("*") if path.suffix in (".safetensors", ".bin")]
    load = functools.partial(
        pipeline_class.from_pretrained,
        snapshot,
        dtype=dtype,
        # Only where a weight file carries it: diffusers refuses a variant no file has, and a
        # repo without fp16 files is pulled with every component on its fallback.
        variant=spec.variant if spec.variant and any(f".{spec.variant}." in w for w in weights) else None,
        # Only where every component has safetensors: a pickle-only repo still loads.
        use_safetensors=True if weights and all(w.endswith(".safetensors") for w in weights) else None,
        local_files_only=True,
        low_cpu_mem_usage=True,
        **kwargs,
    )
    device_map = _device_map(device) if direct_to_device else None
    pipe = None
    if device_map is not None:
        try:
            pipe = load(device_map=device_map)
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
            # A speed-up must never be why a model does not load: take the plain path.
            logger.warning("%s: loading with device_map=%r failed (%s); loading to the CPU first",
                           spec.operation, device_map, _first_line(error))
    if pipe is None:
        pipe = load()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_rmbg(
    spec: ModelSpec, snapshot: Path, *, device: torch.device, dtype: torch.dtype, direct_to_device: bool = False
) -> torch.nn.Module:
    """RMBG-1.4's own class, built from the snapshot's code, with its safetensors weights.

    `AutoModelForImageSegmentation.from_pretrained(trust_remote_code=True)` fails on this
    repo under transformers 5 (its `BriaRMBG` never calls `post_init()`), so we take the
    class through the same remote-code machinery, build it without random init (on the
    meta device) and load the weights strictly. Only the snapshot on disk, at the commit
    the lock pins, is ever imported.
    """
    from safetensors.torch import load_file
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config_json = json.loads((snapshot / "config.json").read_text())
    auto_map = config_json.get("auto_map", {})

    def own_class(key: str, default: str):
        # transformers also takes "other/repo--module.Class" (code from another repository)
        # and dotted module paths: only a module file of this snapshot is ever imported.
        reference = auto_map.get(key, default)
        module, _, name = str(reference).rpartition(".")
        if not (module.isidentifier() and name.isidentifier() and (snapshot / f"{module}.py").is_file()):
            raise ModelError(f"{snapshot / 'config.json'}: auto_map.{key} is {reference!r}, not a class of the "
                             f"snapshot's own code; check it with `imagen models verify`")
        return get_class_from_dynamic_module(reference, snapshot, local_files_only=True)

    model_class = own_class("AutoModelForImageSegmentation", "briarmbg.BriaRMBG")
    config_class = getattr(model_class, "config_class", None)
    if config_class is None or not hasattr(config_class, "model_type"):
        config_class = own_class("AutoConfig", "MyConfig.RMBGConfig")
    config = config_class(in_ch=config_json.get("in_ch", 3), out_ch=config_json.get("out_ch", 1))
    with torch.device("meta"):
        model = model_class(config)
    target = str(device) if direct_to_device and torch.device(device).type == "cuda" else "cpu"
    model.load_state_dict(load_file(snapshot / "model.safetensors", device=target), strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelError(f"{snapshot / 'model.safetensors'} does not set {', '.join(left[:5])}")
    return model.eval().to(device=device, dtype=dtype)


_LOADERS = {DIFFUSERS: _load_pipeline, RMBG: _load_rmbg}
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, SafetensorError)
_LIBRARIES = {DIFFUSERS: ("diffusers", "transformers"), RMBG: ("transformers",)}  # what each loader imports


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
