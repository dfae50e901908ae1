"""Explainers: an LLM that reads highlighted exemplars and writes a one-phrase description of a neuron.

An explainer has `complete(messages, temperature=, seed=, max_tokens=) -> str`. Two come with neuronscope:
- `LocalExplainer(subject)`: a local instruct model (a neuronscope Subject with a chat template);
- `OpenAIExplainer(url, model=...)`: any OpenAI-compatible /v1/chat/completions endpoint (httpx; the API key from
  the argument or the OPENAI_API_KEY environment variable).
`make_explainer` builds one from a CLI string (an http(s) URL, or a model path / .gguf / hub id).
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Protocol, Sequence, overload

from ..errors import NeuronscopeError

if TYPE_CHECKING:
    from ..subject import Subject

Message = dict[str, str]


class Explainer(Protocol):
    """What describe needs of an explainer (`name`, when it has one, is recorded in the manifest)."""

    def complete(self, messages: list[Message], temperature: float = 0.0, seed: int | None = None,
                 max_tokens: int | None = None) -> str: ...

SYSTEM = ("You are an interpretability researcher. You look at text excerpts where one neuron of a language model "
          "activates and say, in one short phrase, what it responds to.")


def highlight(exemplar: dict[str, Any], threshold: float = 0.5, polarity: str = "pos") -> str:
    """The exemplar's text with firing tokens marked <<like this>>: the peak token, and where per-token activations
    are known, every token at or above `threshold` x the peak (same sign)."""
    toks, pos = exemplar["tokens"], exemplar["position"]
    acts = exemplar.get("acts")
    marked = {pos}
    if acts is not None:
        sign = -1.0 if polarity == "neg" else 1.0
        peak = max(sign * a for a in acts)
        if peak > 0:
            marked |= {j for j, a in enumerate(acts) if sign * a >= threshold * peak}
    return "".join(f"<<{t}>>" if j in marked else t for j, t in enumerate(toks)).replace("\n", " ")


def explain_prompt(exemplars: Sequence[dict[str, Any]], polarity: str = "pos", decoded: Sequence[str] = ()
                   ) -> list[Message]:
    """Chat messages asking for a description of a neuron from its top exemplars (and its decoded tokens)."""
    lines = [f"{j + 1}. {highlight(e, polarity=polarity)}" for j, e in enumerate(exemplars)]
    extra = f"\nWhen it fires, it promotes these output tokens: {', '.join(repr(t) for t in decoded)}." \
        if decoded else ""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Excerpts where the neuron fires most (firing tokens are marked <<like this>>):\n"
                                    + "\n".join(lines) + extra +
                                    "\nIn under 12 words, what does this neuron respond to? Quote the key tokens."},
    ]


def clean_reply(text: str) -> str:
    """First line of a reply, without 'Description:'-style prefixes and wrapping quotes."""
    text = (text or "").strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(description|answer|explanation)\s*:\s*", "", line, flags=re.I)
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1]
    return line.strip()[:300]


class LocalExplainer:
    """A local instruct model as the explainer (greedy at temperature 0, sampled otherwise)."""

    def __init__(self, subject: Subject, max_new_tokens: int = 40):
        if not subject.has_chat_template:
            raise NeuronscopeError(f"The explainer model '{subject.name}' has no chat template; use an instruct "
                                   "model.")
        self.subject = subject
        self.max_new_tokens = max_new_tokens
        self.name = subject.name

    def complete(self, messages: list[Message], temperature: float = 0.0, seed: int | None = None,
                 max_tokens: int | None = None) -> str:
        ids = self.subject.encode_chat(messages)
        out = self.subject.generate_ids(ids, max_new_tokens=max_tokens or self.max_new_tokens,
                                        temperature=temperature, seed=seed)
        return self.subject.decode(out[0] if out.ndim == 2 else out)


class OpenAIExplainer:
    """An OpenAI-compatible chat-completions endpoint as the explainer.

    url: the server's base URL ("http://host:8000", ".../v1") or the full /chat/completions URL. client: an
    httpx.Client to use (tests pass one with a MockTransport).
    """

    def __init__(self, url: str, model: str = "default", api_key: str | None = None, timeout: float = 120.0,
                 client: Any = None) -> None:
        import httpx
        url = url.rstrip("/")
        if not url.endswith("/chat/completions"):
            url = url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")
        self.url, self.model = url, model
        self.name = f"{model}@{url}"
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = client or httpx.Client(timeout=timeout)

    def complete(self, messages: list[Message], temperature: float = 0.0, seed: int | None = None,
                 max_tokens: int | None = None) -> str:
        import httpx
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": float(temperature)}
        if seed is not None:
            body["seed"] = int(seed)
        if max_tokens:
            body["max_tokens"] = int(max_tokens)
        try:
            r = self._client.post(self.url, json=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise NeuronscopeError(f"The explainer endpoint {self.url} could not be reached: {exc}") from None
        if r.status_code != 200:
            raise NeuronscopeError(f"The explainer endpoint {self.url} answered {r.status_code}: {r.text[:200]}")
        try:
            reply: str = r.json()["choices"][0]["message"]["content"] or ""
            return reply
        except (ValueError, KeyError, IndexError, TypeError):
            raise NeuronscopeError(f"The explainer endpoint {self.url} did not answer in the chat-completions "
                                   "format.") from None


@overload
def make_explainer(spec: None, *, model_name: str = "default", api_key: str | None = None) -> None: ...
@overload
def make_explainer(spec: str | os.PathLike[str] | Subject | Explainer, *, model_name: str = "default",
                   api_key: str | None = None) -> Explainer: ...
def make_explainer(spec: Any, *, model_name: str = "default", api_key: str | None = None) -> Explainer | None:
    """An explainer from a URL, a model path/GGUF/hub id, a Subject, or anything with `.complete` (returned as is)."""
    if spec is None:
        return None
    if hasattr(spec, "complete"):
        given: Explainer = spec
        return given
    if hasattr(spec, "encode_chat"):
        return LocalExplainer(spec)
    if isinstance(spec, str) and re.match(r"^https?://", spec):
        return OpenAIExplainer(spec, model=model_name, api_key=api_key)
    from ..subject import Subject
    return LocalExplainer(Subject.load(spec))
