"""Finding and writing checkpoints.

Finding: a model reference is a local directory or a Hugging Face hub id (``org/name``).
``resolve_model_dir`` looks for the directory first, then resolves the id the way transformers
does (the hub cache ``$HF_HOME/hub/models--org--name``, a branch or tag through ``refs/<revision>``
to ``snapshots/<commit>/``; from the cache alone when ``HF_HUB_OFFLINE`` is set, else downloading
what is missing). ``read_config`` and ``check_weights`` then check the files of that directory
cheaply (JSON, safetensors headers) so a broken checkpoint is named before anything is loaded.

Writing: ``atomic_output_dir`` gives a hidden temporary directory next to the output and renames it
into place when the block ends, so an output is either the complete new result or untouched.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from dlo.errors import UserError, kernel_filesystem, os_error_reason

# What a model download needs (weights, configs, tokenizer, chat template), not every file of a repository.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# The weights of a routed layer's router (dlo/routing.py), by layer index.
ROUTER_KEY = re.compile(r"layers\.(\d+)\.router\.")
# Either one makes a directory's tokenizer loadable (AutoTokenizer.from_pretrained).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors itself refuses headers above this size; a bigger length means the file is not one.
SAFETENSORS_MAX_HEADER = 100 * 2**20


# -- finding -----------------------------------------------------------------------------------------------------


def resolve_model_dir(ref: str | os.PathLike, revision: str | None = None, gguf_file: str | None = None) -> str:
    """The local directory of the model ``ref`` names: a directory, else a hub id (``revision``: branch, tag
    or commit; ignored for a directory). A GGUF file, given as a path ending in ``.gguf`` or as ``gguf_file``
    (a file name inside the directory or hub repository ``ref``), resolves to its converted safetensors
    checkpoint (``dlo.gguf``: converted on first use, cached after). Raises one ``UserError`` that names
    everything tried."""
    from dlo.gguf import gguf_checkpoint, is_gguf_reference

    ref = os.fspath(ref)
    local = os.path.abspath(os.path.expanduser(ref))
    if gguf_file is not None:
        if not is_gguf_reference(gguf_file):
            raise UserError(f"gguf_file {gguf_file!r}: not a GGUF file name (it must end in .gguf)")
        folder = local if os.path.isdir(local) else _hub_snapshot(ref, revision, local, patterns=[gguf_file])
        return gguf_checkpoint(os.path.join(folder, gguf_file))
    if is_gguf_reference(ref) and not os.path.isdir(local):
        return gguf_checkpoint(local)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise UserError(f"model {ref!r}: {local} is a file, not a model directory (nor a .gguf file)")
    return _hub_snapshot(ref, revision, local)


def _hub_snapshot(repo_id: str, revision: str | None, local: str, patterns: list[str] | None = None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.is_offline_mode()
    cache = constants.HF_HUB_CACHE
    wanted = revision or constants.DEFAULT_REVISION
    tried = f"model {repo_id!r} not found: no local directory {local}"
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                 allow_patterns=patterns or MODEL_FILE_PATTERNS)
    except HFValidationError:
        raise UserError(f"{tried}, and {repo_id!r} is not a hub id either (org/name)") from None
    except RevisionNotFoundError:
        raise UserError(f"{tried}; the Hub has {repo_id!r} but no revision {wanted!r}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{tried}; the Hub has no model {repo_id!r} (or it is private or gated: log in with "
                        "`hf auth login`)") from None
    except IncompleteSnapshotError as err:
        raise UserError(f"{tried}; {str(err).splitlines()[0]}") from None
    except LocalEntryNotFoundError as err:
        where = _cache_contents(cache, repo_id, wanted)
        if offline:
            why = "HF_HUB_OFFLINE is set, so the Hub was not asked (unset it to download)"
        else:
            why = f"the Hub could not be reached ({str(err).splitlines()[0]})"
        raise UserError(f"{tried}; {where}; {why}") from None
    except HfHubHTTPError as err:
        raise UserError(f"{tried}; the Hub answered: {str(err).splitlines()[0]}") from None


def _cache_contents(cache: str, repo_id: str, revision: str) -> str:
    """What the hub cache holds of ``repo_id``, for a not-found message."""
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    storage = os.path.join(cache, folder)
    if not os.path.isdir(storage):
        return f"the Hugging Face cache {cache} has no {folder} (revision {revision!r})"
    refs_dir = os.path.join(storage, "refs")
    refs = sorted(os.path.relpath(os.path.join(root, name), refs_dir)
                  for root, _, names in os.walk(refs_dir) for name in names)
    snapshots_dir = os.path.join(storage, "snapshots")
    snapshots = sorted(os.listdir(snapshots_dir)) if os.path.isdir(snapshots_dir) else []
    cached = ", ".join(refs + snapshots) or "none"
    return f"the Hugging Face cache {storage} has no revision {revision!r} (cached: {cached})"


def adapter_base_dir(model_dir: str) -> str | None:
    """The resolved base model of a peft adapter directory (``base_model_name_or_path``, a directory or a
    hub id, at the adapter's ``revision``); ``None`` when ``model_dir`` holds no adapter."""
    adapter_file = os.path.join(model_dir, "adapter_config.json")
    if not os.path.isfile(adapter_file):
        return None
    adapter = read_json(adapter_file)
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_file}: no 'base_model_name_or_path'; the adapter does not say which model it "
                        "adapts")
    try:
        return resolve_model_dir(base, adapter.get("revision"))
    except UserError as err:
        raise UserError(f"{model_dir}: LoRA adapter whose base model cannot be found: {err}") from None


def read_json(path: str) -> dict:
    """A JSON object from ``path``; a missing, unreadable or malformed file is a ``UserError`` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text (UTF-8) file, so not JSON") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(model_dir: str) -> dict:
    """``config.json`` of a model directory, checked to be a transformers model config."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; {model_dir} is not a saved model directory (save_pretrained writes "
                        "config.json)")
    config = read_json(path)
    if "model_type" not in config:
        raise UserError(f"{path}: no 'model_type' key, so not a transformers model config")
    return config


def safetensors_keys(path: str) -> list[str]:
    """The tensor names of a safetensors file, once its header is found to describe the whole file: a
    truncated or corrupt file is a ``UserError`` naming it (only the header is read)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if size < 8 or length > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise UserError(f"{path}: not a complete safetensors file (a {size}-byte file cannot hold the "
                            f"{length}-byte header it announces): truncated, or not safetensors at all")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise UserError(f"{path}: corrupt safetensors header (not the JSON tensor table safetensors "
                        "writes)") from None
    data_bytes, described = size - 8 - length, max(ends, default=0)
    if described > data_bytes:
        raise UserError(f"{path}: truncated safetensors file: its header describes {described} bytes of tensor "
                        f"data, the file holds {data_bytes}")
    if described < data_bytes:
        raise UserError(f"{path}: corrupt safetensors file: {data_bytes - described} bytes after the last "
                        "tensor its header describes")
    return [name for name in header if name != "__metadata__"]


def weight_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file, for a single-file or sharded checkpoint, every file checked."""
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: no 'weight_map' of tensor names to shard files")
        keys = {}
        for name in sorted(set(weight_map.values())):
            shard = os.path.join(model_dir, name)
            if not os.path.isfile(shard):
                raise UserError(f"{index} names the shard {name}, which {model_dir} does not hold")
            keys[name] = set(safetensors_keys(shard))
        missing = [key for key, name in weight_map.items() if key not in keys[name]]
        if missing:
            raise UserError(f"{index}: {len(missing)} tensors are not in the shard it names for them, e.g. "
                            f"{missing[0]!r} in {weight_map[missing[0]]}")
        return {key: os.path.join(model_dir, name) for key, name in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return dict.fromkeys(safetensors_keys(single), single)
    raise UserError(f"{model_dir}: no model.safetensors or {SAFETENSORS_INDEX} (re-save the model with "
                    "save_pretrained, which writes safetensors)")


def check_routing_config(model_dir: str, config: dict):
    """Refuse a checkpoint whose weights hold routers while its ``config.json`` (``config``) has no ``dlo_routing``
    section: loaded as a plain model, the routers would be dropped or transformers would ask for remote code."""
    if "dlo_routing" in config:
        return
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in ("model.safetensors", SAFETENSORS_INDEX)):
        return  # pytorch_model.bin: its tensor names cannot be listed without loading it
    layers = sorted({int(m.group(1)) for key in weight_files(model_dir) if (m := ROUTER_KEY.search(key))})
    if layers:
        raise UserError(f"{os.path.join(model_dir, 'config.json')}: no 'dlo_routing' section, but the weights hold "
                        f"routers for layers {layers}: the checkpoint lost its routing config; "
                        "restore the config.json dlo saved with these weights (its 'dlo_routing' says which layers "
                        "route, at what capacity and threshold)")


def check_weights(model_dir: str):
    """Refuse a model or adapter directory without weights, or with a broken safetensors file."""
    is_adapter = os.path.isfile(os.path.join(model_dir, "adapter_config.json"))
    expected = ADAPTER_WEIGHT_FILES if is_adapter else MODEL_WEIGHT_FILES
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in expected):
        raise UserError(f"{model_dir}: no weights (expected one of {', '.join(expected)})")
    if os.path.isfile(os.path.join(model_dir, SAFETENSORS_INDEX)):
        weight_files(model_dir)
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            safetensors_keys(os.path.join(model_dir, name))


# -- writing -----------------------------------------------------------------------------------------------------


def check_output_dir(path: str | os.PathLike, force: bool = False, inputs: Iterable[str] = ()) -> str:
    """The absolute output path, once it is known to be writable: not a file, empty unless ``force``, not
    holding one of ``inputs`` (replacing it would delete them), under a directory we may write in."""
    output = os.path.abspath(os.fspath(path))
    for source in inputs:
        source_path = os.path.abspath(source)
        if source_path == output or source_path.startswith(output + os.sep):
            raise UserError(f"output {output!r} holds the input {source!r}, which replacing it would delete; "
                            "choose another output directory")
    root = kernel_filesystem(output)
    if root:
        raise UserError(f"output {output!r} is under {root}, the kernel's virtual file system, where no files can "
                        "be written; choose a directory on disk")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise UserError(f"output {output!r} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not force:
        raise UserError(f"output {output!r} exists and is not empty; pass --force to replace it")
    ancestor = os.path.dirname(output)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"output {output!r}: {ancestor} is a file, so no directory can be made under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output {output!r}: no permission to write in {ancestor}")
    return output


@contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False, inputs: Iterable[str] = ()) -> Iterator[str]:
    """``with atomic_output_dir(out, force) as tmp:`` write into ``tmp``; at the end of the block ``tmp``
    becomes ``out`` (replacing what was there, which ``check_output_dir`` allowed). On any exception the
    temporary directory and any parent directory made for it are removed and ``out`` is left as it was.
    Directories get the umask's permissions.

    An ``OSError`` while writing (no permission, a read-only or full disk) becomes a ``UserError`` naming the
    output and the file in it, never the hidden temporary directory the user did not ask for."""
    inputs = list(inputs)
    output = check_output_dir(path, force, inputs)
    made, tmp = [], None
    try:
        made = _make_parents(os.path.dirname(output))
        tmp = _hidden_sibling(output, "tmp")
        yield tmp
        check_output_dir(output, force, inputs)  # another process may have written there meanwhile
        _move_into_place(tmp, output)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):
            try:
                os.rmdir(folder)
            except OSError:
                break
        system = _system_error(err)
        if system is not None and _writes_under(system, output, tmp):
            where = _as_output(system.filename, output, tmp)
            what = "it" if where == output else os.path.relpath(where, output) if where.startswith(output) else where
            raise UserError(f"output {output!r}: writing {what} failed: {os_error_reason(system, where)}") from err
        raise


def _system_error(err: BaseException) -> OSError | None:
    """``err`` as the OSError it is or reports: safetensors' writer raises its own error type that only quotes
    the system's (``... I/O error: File too large (os error 27)``)."""
    if isinstance(err, OSError):
        return err
    found = re.search(r"\(os error (\d+)\)", str(err)) if type(err).__name__ == "SafetensorError" else None
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def _writes_under(err: OSError, output: str, tmp: str | None) -> bool:
    """Whether ``err`` is about writing ``output``: a file in it or its temporary directory, a directory made for
    it, or an error naming no file (a full disk reported by a library)."""
    if err.filename is None:
        return err.errno is not None
    name = os.path.abspath(os.fspath(err.filename))
    return any(name == place or name.startswith(place + os.sep)
               for place in (output, tmp, os.path.dirname(output)) if place) or output.startswith(name + os.sep)


def _as_output(filename, output: str, tmp: str | None) -> str:
    """The path the user would know for ``filename``: inside the temporary directory means inside ``output``."""
    if filename is None:
        return output
    name = os.path.abspath(os.fspath(filename))
    if tmp and (name == tmp or name.startswith(tmp + os.sep)):
        return output + name[len(tmp):]
    if os.path.basename(name).startswith(f".{os.path.basename(output)}."):  # the hidden sibling, not yet made
        return output
    return name


def _make_parents(folder: str) -> list[str]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for made in reversed(missing):
        os.mkdir(made)
    return missing[::-1]


def _hidden_sibling(output: str, kind: str) -> str:
    """A new empty directory ``.NAME.KIND-XXXX`` next to ``output``. ``os.mkdir`` (unlike ``mkdtemp``, which
    makes 0700 directories) applies the umask, so the renamed output gets the permissions users expect."""
    parent, name = os.path.split(output)
    while True:
        candidate = os.path.join(parent, f".{name}.{kind}-{secrets.token_hex(4)}")
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue


def _move_into_place(tmp: str, output: str):
    if not os.path.lexists(output):
        os.rename(tmp, output)
        return
    old = _hidden_sibling(output, "old")
    previous = os.path.join(old, "previous")
    os.rename(output, previous)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(previous, output)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)
