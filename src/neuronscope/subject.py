"""Subject: a loaded causal LM, its tokenizer and its ArchSpec, loaded from a folder, a hub id or a GGUF file.

`Subject.load(...)` is the one way neuronscope loads a model; every failure is turned into one sentence
(`NeuronscopeError`) that names what was wrong and what is supported.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import os
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .arch import SUPPORTED_MODEL_TYPES, ArchSpec, _weight, spec_for, spec_for_model_type
from .errors import NeuronscopeError
from .interventions import Intervention, intervene
from .refs import check_layer, check_neurons, parse_index_set

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class ModelInfo:
    """Facts about a loaded model (`Subject.info()`, `neuronscope info`); `model_class` is the *ForCausalLM class."""
    name: str
    family: str
    model_type: str | None
    model_class: str
    layers: int
    neurons_per_layer: int
    neurons_total: int
    hidden_size: int
    vocab_size: int
    gated_mlp: bool
    tied_lm_head: bool
    parameters: int
    dtype: str
    device: str
    sites: list[str]
    has_chat_template: bool
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        """The facts by name, as `neuronscope info --json` prints them ("class" for `model_class`)."""
        return {("class" if k == "model_class" else k): v for k, v in asdict(self).items()}


_CALL_ARGS: dict[type, tuple[str, bool]] = {}


def call_args(subject: Subject) -> tuple[str, bool]:
    """(the forward's name for the KV cache, whether it takes logits_to_keep), read once per model class."""
    cls = type(subject.model)
    got = _CALL_ARGS.get(cls)
    if got is None:
        params = inspect.signature(subject.model.forward).parameters
        got = _CALL_ARGS[cls] = ("cache" if "cache" in params else "past_key_values", "logits_to_keep" in params)
    return got


@dataclass
class ResolvedSource:
    """Where a model comes from: a local folder, a hub id, or a GGUF file inside a folder."""
    location: str
    gguf_file: str | None = None
    is_local: bool = True

    @property
    def display(self) -> str:
        return str(Path(self.location) / self.gguf_file) if self.gguf_file else self.location


def resolve_source(source: str | os.PathLike[str] | None, gguf_file: str | None = None) -> ResolvedSource:
    """Turn what a user typed into a loadable location; `None` means the default model (see `models`)."""
    if source is None:
        from .models import default_model_path
        path = default_model_path()
        return ResolvedSource(str(path.parent), path.name)
    text = str(source)
    path = Path(text).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise NeuronscopeError(f"No folder at '{text}' to hold the GGUF file '{gguf_file}'.")
        if not (path / gguf_file).is_file():
            raise NeuronscopeError(f"No GGUF file '{gguf_file}' in '{text}'.")
        return ResolvedSource(str(path), gguf_file)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedSource(str(path.parent), path.name)
        raise NeuronscopeError(
            f"'{text}' is a file but not a .gguf file; give a model folder (config.json + weights), "
            "a .gguf file, or a Hugging Face hub id."
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedSource(str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSource(str(path), ggufs[0])
        if len(ggufs) > 1:
            raise NeuronscopeError(
                f"'{text}' holds several GGUF files ({', '.join(ggufs)}); name one with --gguf-file or its path."
            )
        raise NeuronscopeError(
            f"The folder '{text}' has no config.json and no .gguf file, so it is not a Hugging Face model folder."
        )
    looks_local = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) \
        or text.count("/") > 1 or text.endswith(".gguf")
    if looks_local or not _HUB_ID.match(text):
        raise NeuronscopeError(
            f"No model at '{text}': it is not an existing folder, not a .gguf file, and not a Hugging Face hub id "
            "(like 'HuggingFaceTB/SmolLM2-135M-Instruct')."
        )
    return ResolvedSource(text, None, is_local=False)


def _load_config(src: ResolvedSource, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        return AutoConfig.from_pretrained(src.location, **kwargs)
    except Exception as exc:  # transformers raises many types here; the user needs one sentence
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not src.is_local:
            raise NeuronscopeError(
                f"Could not fetch the model '{src.location}' from the Hugging Face hub ({first}). "
                "Check the id and your network, or give a local folder or .gguf file."
            ) from None
        raise NeuronscopeError(f"Could not read the model configuration at '{src.display}': {first}") from None


def fingerprint_model(model: nn.Module) -> str:
    """A stable hash of a model's weights: every tensor's name, shape, dtype and bytes (blake2b; ~1 GB/s on a CPU)."""
    h = hashlib.blake2b(digest_size=16)
    seen: set[int] = set()
    for name, p in model.state_dict(keep_vars=True).items():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


@dataclass
class Subject:
    """A causal LM under study: the HF model, its tokenizer and where its parts are (`spec`)."""
    model: nn.Module
    tokenizer: Any
    spec: ArchSpec
    name: str = "model"
    source: ResolvedSource | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    # ---- loading ----------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] | None = None,
        *,
        gguf_file: str | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        device_map: str | dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        require_chat_template: bool = False,
        status: Callable[[str], None] | None = None,
        _convert: bool = True,
    ) -> Subject:
        """Load a causal LM from a folder, a hub id or a GGUF file (`None`: the default model).

        dtype: float32 (default; the fast choice on CPUs), bfloat16 or float16. device: "cpu", "cuda", "cuda:1"...
        device_map: "auto" to spread a big model over several GPUs (accelerate).
        require_chat_template: refuse a model without a chat template before any weights are read (for --chat).
        status: called with one line before each slow step (the CLI shows it on its status line).
        A GGUF file is de-quantized once and kept as safetensors in the cache (see `converted_gguf_dir`), so later
        loads take a second instead of tens of seconds; set NEURONSCOPE_GGUF_CACHE=0 to turn that off.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        say = status or (lambda _msg: None)
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # our own status line says what loads
        src = resolve_source(source, gguf_file)
        torch_dtype = _parse_dtype(dtype)
        if src.gguf_file and _convert and gguf_cache_enabled():
            converted = converted_gguf_dir(src)
            if not (converted / "config.json").is_file():
                if require_chat_template:
                    _require_chat_template(src, gguf_chat_template(src) is not None)
                subject = cls.load(source, gguf_file=gguf_file, dtype="float32", trust_remote_code=trust_remote_code,
                                   status=status, _convert=False)
                say(f"Saving the de-quantized model as safetensors in {converted} (once: later loads take a "
                    "second)...")
                save_converted(subject, converted)
            say(f"Loading the de-quantized copy of {src.display} from {converted}...")
            subject = cls.load(converted, dtype=torch_dtype, device=device, device_map=device_map,
                               trust_remote_code=trust_remote_code, require_chat_template=require_chat_template,
                               status=status)
            subject.name, subject.source = src.display, src
            return subject
        config = _load_config(src, trust_remote_code)
        model_type = getattr(config, "model_type", "?")
        spec_for_model_type(model_type)  # clear error before any weights are read
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if src.gguf_file:
            kwargs["gguf_file"] = src.gguf_file
        if device_map is not None:
            kwargs["device_map"] = device_map
        tok_kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        try:
            tokenizer = None
            if require_chat_template:
                if src.gguf_file:
                    _require_chat_template(src, gguf_chat_template(src) is not None)
                else:  # the tokenizer is small and fast to load: check it before the weights
                    tokenizer = AutoTokenizer.from_pretrained(src.location, **tok_kwargs)
                    _require_chat_template(src, bool(getattr(tokenizer, "chat_template", None)))
            say(f"Loading the weights of {src.display}" + (" (de-quantizing the GGUF tensors)..." if src.gguf_file
                                                            else "..."))
            model: Any = AutoModelForCausalLM.from_pretrained(src.location, **kwargs)
            if tokenizer is None:
                say(f"Loading the tokenizer of {src.display}" + (" (converting the GGUF vocabulary; a large "
                                                                 "vocabulary takes minutes)..." if src.gguf_file
                                                                 else "..."))
                tokenizer = AutoTokenizer.from_pretrained(src.location, **tok_kwargs)
        except NeuronscopeError:
            raise
        except Exception as exc:  # safetensors, gguf and transformers each raise their own types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NeuronscopeError(f"Could not load the model at '{src.display}': {first}") from None
        if device is not None and device_map is None:
            model.to(device)
        model.eval()
        model.requires_grad_(False)
        name = src.display if src.is_local else src.location
        # the tokenizer is ours (loaded here), so giving it a pad token changes nobody else's object
        return cls.from_model(model, tokenizer, name=name, source=src, set_pad_token=True)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any = None, *, name: str = "model",
                   source: ResolvedSource | None = None, set_pad_token: bool = False) -> Subject:
        """Wrap an already loaded `*ForCausalLM` model (for notebooks and tests).

        The tokenizer is left as it is unless set_pad_token (then a tokenizer without a pad token gets its end
        token as pad token); batching uses `Subject.pad_token_id` either way."""
        spec = spec_for(model)
        if set_pad_token and tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
            eos = getattr(tokenizer, "eos_token", None)
            if eos is not None:
                tokenizer.pad_token = eos
        return cls(model=model, tokenizer=tokenizer, spec=spec, name=name, source=source)

    @property
    def pad_token_id(self) -> int | None:
        """The id used to pad a batch: the tokenizer's pad token, else its end-of-sequence token."""
        for attr in ("pad_token_id", "eos_token_id"):
            v = getattr(self.tokenizer, attr, None)
            if isinstance(v, int):
                return v
        return None

    # ---- shape ------------------------------------------------------------------------------------------
    @property
    def hf(self) -> Any:
        """The wrapped transformers model, typed loosely (its methods are not annotated)."""
        return self.model

    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def layers(self) -> nn.ModuleList:
        return self.spec.decoder_layers(self.model)

    @cached_property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def n_neurons(self) -> int:
        """MLP neurons per layer (the width of the down projection's input)."""
        return self.spec.write_vectors(self.model, 0).shape[0]

    @cached_property
    def hidden_size(self) -> int:
        return self.spec.unembedding(self.model).shape[1]

    @cached_property
    def vocab_size(self) -> int:
        return self.spec.unembedding(self.model).shape[0]

    @property
    def device(self) -> torch.device:
        return _weight(self.spec.get(self.model, self.spec.embed)).device

    @property
    def dtype(self) -> torch.dtype:
        return _weight(self.spec.get(self.model, self.spec.embed)).dtype

    @property
    def tied(self) -> bool:
        return self.spec.is_tied(self.model)

    @property
    def has_mid_site(self) -> bool:
        return self.spec.has_mid(self.model)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_model(self.model)
        return self._fingerprint

    def sites(self) -> list[str]:
        """Names of the places capabilities can read or write."""
        s = ["neurons", "resid.post"]
        if self.has_mid_site:
            s.insert(1, "resid.mid")
        return s

    def info(self) -> ModelInfo:
        """Facts about the model, as shown by `neuronscope info`."""
        n_params = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        return ModelInfo(
            name=self.name, family=self.family, model_type=getattr(self.config, "model_type", None),
            model_class=type(self.model).__name__, layers=self.n_layers, neurons_per_layer=self.n_neurons,
            neurons_total=self.n_layers * self.n_neurons, hidden_size=self.hidden_size, vocab_size=self.vocab_size,
            gated_mlp=self.spec.gated, tied_lm_head=self.tied, parameters=n_params,
            dtype=str(self.dtype).replace("torch.", ""), device=str(self.device), sites=self.sites(),
            has_chat_template=self.has_chat_template, fingerprint=self.fingerprint)

    # ---- validation -------------------------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        """`layer` when it is a layer of this model, else one sentence (refs.check_layer)."""
        return check_layer(layer, self.n_layers)

    def check_neurons(self, neurons: Sequence[int]) -> list[int]:
        """`neurons` when each is a neuron id of this model's layers, else one sentence (refs.check_neurons)."""
        return check_neurons(neurons, self.n_neurons)

    def parse_layers(self, text: str | Sequence[int] | None) -> list[int]:
        """Layer sets: 'all', '0-7', '3,7,11', '0-3,8' or a list of ints; `None` means all."""
        if text is None:
            return list(range(self.n_layers))
        if not isinstance(text, str):
            return [self.check_layer(int(x)) for x in text]
        return [self.check_layer(x) for x in parse_index_set(text, self.n_layers, what="layer")]

    # ---- text -------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str, *, chat: bool = False, system: str | None = None) -> torch.Tensor:
        """Token ids [1, T] for a prompt, through the chat template when `chat` (and a system message if given)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise NeuronscopeError("The prompt is empty; give some text.")
        if self.tokenizer is None:
            raise NeuronscopeError("This subject has no tokenizer.")
        if chat:
            if not self.has_chat_template:
                raise NeuronscopeError(f"The model '{self.name}' has no chat template; drop --chat.")
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            return self.encode_chat(messages)
        ids: torch.Tensor = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> torch.Tensor:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 return_tensors="pt")
        ids = out if torch.is_tensor(out) else out["input_ids"]
        return ids.to(self.device)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def token_strings(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        """Each id as the text it stands for (for tables and the web page)."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return [self.tokenizer.decode([i]) for i in ids]

    # ---- running ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits: torch.Tensor = self.hf(input_ids=input_ids.to(self.device), attention_mask=attention_mask).logits
        return logits

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, attention_mask: torch.Tensor | None = None,
                     streamer: Any = None, stop_strings: Any = None) -> torch.Tensor:
        """Generate after `input_ids` ([B, T]); temperature 0 means greedy. Returns only the new ids [B, n]."""
        if max_new_tokens < 1:
            raise NeuronscopeError("max_new_tokens must be at least 1.")
        if not (temperature >= 0.0) or temperature != temperature or temperature == float("inf"):
            raise NeuronscopeError(f"Temperature must be a finite number >= 0, got {temperature}.")
        kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        pad = self.pad_token_id
        if pad is not None:
            kwargs["pad_token_id"] = pad
        if streamer is not None:
            kwargs["streamer"] = streamer
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        if temperature > 0 and seed is not None:
            # a seeded sample: the global RNG is seeded inside fork_rng, so the caller's RNG state is left as it was
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = self.hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            out = self.hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new: torch.Tensor = out[:, input_ids.shape[1]:]
        return new

    def generate(self, prompt: str, *, chat: bool = False, max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int | None = None, system: str | None = None,
                 interventions: Sequence[Intervention] = ()) -> str:
        """Text generated after `prompt` (with `interventions` active in prefill and every decoded position)."""
        ids = self.encode(prompt, chat=chat, system=system)
        with intervene(self, *interventions):
            new = self.generate_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return self.decode(new[0])


def gguf_chat_template(src: ResolvedSource) -> str | None:
    """The chat template stored in a GGUF file's metadata (read without loading any tensor), or None."""
    if not src.gguf_file:
        return None
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(Path(src.location) / src.gguf_file))
        f = reader.fields.get("tokenizer.chat_template")
        if f is None:
            return None
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - unreadable metadata: let the full load report the problem
        return ""


def _require_chat_template(src: ResolvedSource, has: bool) -> None:
    if not has:
        raise NeuronscopeError(f"The model '{src.display}' has no chat template (a base model?), so --chat cannot "
                               "wrap the prompt; drop --chat or use an instruct model.")


def gguf_cache_enabled() -> bool:
    return os.environ.get("NEURONSCOPE_GGUF_CACHE", "1") not in ("0", "false", "no", "off")


def converted_gguf_dir(src: ResolvedSource) -> Path:
    """Where the de-quantized copy of a GGUF file lives: keyed by the file's path, size and modification time.

    $NEURONSCOPE_CONVERTED_DIR, else <neuronscope home>/converted.
    """
    from .models import home
    path = (Path(src.location) / str(src.gguf_file)).resolve()
    st = path.stat()
    key = hashlib.blake2b(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=8).hexdigest()
    root = os.environ.get("NEURONSCOPE_CONVERTED_DIR")
    base = Path(root).expanduser() if root else home() / "converted"
    return base / f"{path.stem}-{key}"


def save_converted(subject: "Subject", folder: Path) -> None:
    """Write a loaded (de-quantized) model as an HF safetensors folder, atomically (temp folder + rename).

    Best effort: a failure to write (disk full, read-only cache) is reported as a warning, never an error.
    """
    import shutil
    import tempfile
    import warnings
    from safetensors.torch import save_file

    model: Any = subject.model
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        seen: dict[int, str] = {}
        tensors = {}
        for name, t in model.state_dict().items():
            if t.data_ptr() in seen:  # tied weights are stored once, as transformers does
                continue
            seen[t.data_ptr()] = name
            tensors[name] = t.detach().to("cpu").contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        subject.tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: theirs is as good as ours
            pass
    except Exception as exc:  # noqa: BLE001 - a cache must never break loading
        warnings.warn(f"neuronscope could not cache the converted GGUF model in {folder}: {exc}", stacklevel=2)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise NeuronscopeError(f"Unknown dtype '{dtype}'; use one of float32, bfloat16, float16.") from None


def supported_families_sentence() -> str:
    return "Supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES) + "."


__all__ = ["Subject", "ModelInfo", "ResolvedSource", "resolve_source", "parse_index_set", "fingerprint_model"]
