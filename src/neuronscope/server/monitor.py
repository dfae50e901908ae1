"""The Monitor's logic, free of HTTP: chat with streaming, token views, activations, attribution, steering.

    mon = Monitor(subject, Knowledge.load(subject, "atlas/smollm2"))
    s = mon.sessions.create()
    for event in mon.send(s, "Tell me about dogs", max_new_tokens=40): ...   # {"type": "token", ...}
    mon.activations(s, page_size=20)["rows"]

One model serves every session: every model call goes through `Monitor.model_lock` (`decoding.FairLock`), first come
first served: answers are decoded one token per call (`decoding.decode`), a view's forward (activations, attribution)
runs in chunks over a KV cache (`decoding.forward_chunks`); one call per core runs at once (each thread's interventions
its own), and the decoding steps waiting at the same time run as one packed forward (`packing`), so a view never holds
up another session's stream by more than about one decoding step. An answer is generated to its end on the server even
if the client goes away, and kept in the session (a reload mid-answer finds it; `state()["generating"]` shows the
partial text meanwhile). Views of a conversation state are computed once and cached in the session until the
conversation or its steerings change. Models without a chat template chat by plain continuation: the conversation is the
text of its turns, the model continues it, and a separator (`PLAIN_SEPARATOR`, shown on the page) goes before each new
user turn.
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Any, Iterator

import torch

from ..errors import NeuronscopeError
from ..interventions import Capture, Clamp
from ..refs import check_neuron, check_polarity
from .decoding import (CHUNK_TOKENS, GRAD_CHUNK_TOKENS, IDLE_CHUNK_TOKENS, STALL_STEPS, FairLock, attribute_chunked,
                       decode, forward_chunks)
from .knowledge import Knowledge
from .packing import packs
from .limits import Limits
from .sessions import Message, Session, SessionStore, Steering

MODES = ("strengthen", "suppress", "clamp")
SORTS = ("activation", "layer", "neuron", "count")
CONTENT_ROLES = ("user", "assistant")      # other tokens are chat template, system prompt or turn separators
PLAIN_SEPARATOR = "\n\n"                   # between turns of a plain-continuation chat (no chat template)
INTERPRETABLE_SCORE = 0.3                  # a description's simulator score from which a neuron counts as interpretable
EXPORT_FORMAT = "neuronscope-monitor-session/1"


class Monitor:
    def __init__(self, subject, knowledge: Knowledge | None = None, limits: Limits | None = None,
                 sessions: SessionStore | None = None, chunk_tokens: int = CHUNK_TOKENS,
                 idle_chunk_tokens: int = IDLE_CHUNK_TOKENS, grad_chunk_tokens: int = GRAD_CHUNK_TOKENS,
                 stall_steps: float = STALL_STEPS):
        """`chunk_tokens`: the most positions of a view's forward (or a prefill) run per model call while an
        answer streams (`grad_chunk_tokens` for an attribution's forward); `idle_chunk_tokens`: the same while none
        does; `stall_steps`: how many decoding steps another session's work may add to a streaming answer's step
        (see `decoding.FairLock`)."""
        for name, v in (("chunk_tokens", chunk_tokens), ("idle_chunk_tokens", idle_chunk_tokens),
                        ("grad_chunk_tokens", grad_chunk_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NeuronscopeError(f"{name} must be a positive number of tokens, got {v!r}.")
        self.subject = subject
        self.chunk_tokens, self.idle_chunk_tokens = chunk_tokens, idle_chunk_tokens
        self.grad_chunk_tokens = grad_chunk_tokens
        self.knowledge = knowledge if knowledge is not None else Knowledge.load(subject, None)
        self.limits = limits if limits is not None else Limits()
        self.sessions = sessions if sessions is not None else SessionStore(
            max_sessions=self.limits.max_sessions, max_per_client=self.limits.max_sessions_per_client)
        self.model_lock = FairLock(stall_steps=stall_steps)
        packs(subject)  # checked once per model, now rather than in the first packed forward (SmolLM2: ~0.7 s)
        self._desc: dict | None = None
        self._desc_lock = threading.Lock()
        self._neuron_cache: dict[tuple, dict] = {}
        max_pos = getattr(subject.config, "max_position_embeddings", None)
        if max_pos:
            self.limits.max_tokens = min(self.limits.max_tokens, int(max_pos))
        self.chat_template = subject.has_chat_template
        self.eos = set()
        for e in (getattr(subject.tokenizer, "eos_token_id", None), getattr(subject.config, "eos_token_id", None)):
            self.eos.update(e if isinstance(e, (list, tuple)) else ([] if e is None else [e]))

    # ---- info ---------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        s = self.subject
        return {"model": {"name": s.name, "family": s.family, "n_layers": s.n_layers, "n_neurons": s.n_neurons,
                          "hidden_size": s.hidden_size, "vocab_size": s.vocab_size, "fingerprint": s.fingerprint},
                "chat_template": self.chat_template,
                "chat_mode": "chat template" if self.chat_template else "plain continuation (no chat template)",
                "capabilities": self.knowledge.capabilities, "notes": list(self.knowledge.notes),
                "limits": self.limits.public()}

    # ---- rendering the conversation ----------------------------------------------------------------------
    def _encode_chat(self, msgs: list[Message], gen: bool) -> list[int]:
        if not msgs:
            return []
        ids = self.subject.encode_chat([{"role": m.role, "content": m.content} for m in msgs],
                                       add_generation_prompt=gen)
        return ids[0].tolist()

    def _plain_ids(self, msgs: list[Message]) -> tuple[list[int], list[tuple[int, int]]]:
        tok = self.subject.tokenizer
        if not msgs:
            return [], []
        ids: list[int] = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        spans = []
        sep = self._separator_ids()
        for k, m in enumerate(msgs):
            if k and m.role == "user":
                ids += sep
            part = m.ids if m.ids is not None else tok(m.content, add_special_tokens=False)["input_ids"]
            spans.append((len(ids), len(ids) + len(part)))
            ids += list(part)
        return ids, spans

    def _separator_ids(self) -> list[int]:
        if not hasattr(self, "_sep"):
            self._sep = list(self.subject.tokenizer(PLAIN_SEPARATOR, add_special_tokens=False)["input_ids"])
        return self._sep

    def render(self, s: Session) -> dict[str, Any]:
        """The conversation's token ids, with the span [start, end) of each message (cached per version)."""
        r = s.cache.get("render")
        if r is not None:
            return r
        if self.chat_template:
            spans = []
            for k, m in enumerate(s.messages):
                start = len(self._encode_chat(s.messages[:k], gen=(m.role == "assistant"))) if k else 0
                spans.append((start, len(self._encode_chat(s.messages[: k + 1], gen=False))))
            ids = self._encode_chat(s.messages, gen=False)
        else:
            ids, spans = self._plain_ids(s.messages)
        roles = ["template"] * len(ids)
        msg_of = [-1] * len(ids)
        strs = self.display_tokens(ids)
        for k, (a, b) in enumerate(spans):
            b = min(b, len(ids))
            content = self._content_positions(strs, a, b, s.messages[k].content)
            for t in range(a, b):
                msg_of[t] = k
                if t in content:
                    roles[t] = s.messages[k].role
        if not self.chat_template:
            for t in range(len(ids)):
                if msg_of[t] < 0 and t > 0:
                    roles[t] = "separator"
        r = s.cache["render"] = {"ids": ids, "spans": spans, "roles": roles, "message": msg_of, "strings": strs}
        return r

    @staticmethod
    def _content_positions(strs: list[str], a: int, b: int, content: str) -> set[int]:
        """Positions in [a, b) whose text is part of the message's own text (not its template or system prompt)."""
        offsets, text = [], ""
        for t in range(a, b):
            offsets.append(len(text))
            text += strs[t]
        needle = content.strip()
        at = text.rfind(needle) if needle else -1
        if at < 0:
            return set(range(a, b))
        lo, hi = at, at + len(needle)
        return {a + k for k, o in enumerate(offsets) if o < hi and o + len(strs[a + k]) > lo}

    def _prompt_ids(self, s: Session) -> list[int]:
        if self.chat_template:
            return self._encode_chat(s.messages, gen=True)
        return self._plain_ids(s.messages)[0]

    def display_tokens(self, ids: list[int]) -> list[str]:
        """Each token as it reads in context (with its leading space, special tokens shown)."""
        tok = self.subject.tokenizer
        out = []
        for t in range(len(ids)):
            one = tok.decode(ids[t:t + 1], skip_special_tokens=False)
            if t:
                prev = tok.decode(ids[t - 1:t], skip_special_tokens=False)
                two = tok.decode(ids[t - 1:t + 1], skip_special_tokens=False)
                if two.startswith(prev) and len(two) > len(prev):
                    one = two[len(prev):]
            out.append(one)
        return out

    def _next_strings(self, prev: int, alts: list[int]) -> list[str]:
        """How each candidate next token reads after `prev` (keeps its leading space)."""
        tok = self.subject.tokenizer
        p = tok.decode([prev], skip_special_tokens=False)
        out = []
        for a in alts:
            two = tok.decode([prev, a], skip_special_tokens=False)
            out.append(two[len(p):] if two.startswith(p) and len(two) > len(p) else tok.decode([a]))
        return out

    # ---- chat ---------------------------------------------------------------------------------------------
    def _check_gen(self, max_new_tokens: int, temperature: float) -> None:
        L = self.limits
        if not 1 <= int(max_new_tokens) <= L.max_new_tokens:
            raise NeuronscopeError(f"max_new_tokens must be between 1 and {L.max_new_tokens}, got {max_new_tokens}.")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and 0.0 <= temperature <= L.max_temperature):
            raise NeuronscopeError(f"Temperature must be between 0 (greedy) and {L.max_temperature}, "
                                   f"got {temperature}.")

    def send(self, s: Session, content: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int | None = None) -> Iterator[dict]:
        """Add a user message and stream the answer (events: token..., then done). Validates before anything."""
        if not isinstance(content, str) or not content.strip():
            raise NeuronscopeError("The message is empty; type something to send.")
        if len(content) > self.limits.max_message_chars:
            raise NeuronscopeError(f"The message has {len(content)} characters; the limit is "
                                   f"{self.limits.max_message_chars}.")
        self._check_gen(max_new_tokens, temperature)
        with s.lock:
            self._check_idle(s)
            s.messages.append(Message("user", content))
            try:
                prompt = self._checked_prompt(s, max_new_tokens)
            except NeuronscopeError:
                s.messages.pop()
                raise
            s.changed()
            s.generating = {"text": "", "n_tokens": 0}
        return self._stream(s, prompt, max_new_tokens, temperature, seed)

    def regenerate(self, s: Session, *, max_new_tokens: int = 64, temperature: float = 0.0,
                   seed: int | None = None) -> Iterator[dict]:
        """Drop the last answer (if any) and answer the last user message again, with the current steerings."""
        self._check_gen(max_new_tokens, temperature)
        with s.lock:
            self._check_idle(s)
            msgs = list(s.messages)
            previous: list[dict] = []
            if msgs and msgs[-1].role == "assistant":
                last = msgs.pop()
                previous = ([{"content": last.content, "steered_by": last.steered_by}] +
                            last.previous)[:self.limits.max_previous_answers]
            if not msgs or msgs[-1].role != "user":
                raise NeuronscopeError("There is no message to answer yet; send one first.")
            old = s.messages
            s.messages = msgs
            try:
                prompt = self._checked_prompt(s, max_new_tokens)
            except NeuronscopeError:
                s.messages = old
                raise
            s.changed()
            s.generating = {"text": "", "n_tokens": 0}
        return self._stream(s, prompt, max_new_tokens, temperature, seed, previous=previous)

    @staticmethod
    def _check_idle(s: Session) -> None:
        if s.generating is not None:
            raise NeuronscopeError("An answer is still being generated in this session; wait for it to finish.")

    def new_chat(self, s: Session) -> None:
        """Clear the conversation; steerings on generated tokens stay (their prompt ranges are dropped)."""
        with s.lock:
            self._check_idle(s)
            s.messages = []
            for sid in list(s.steerings):
                st = s.steerings[sid]
                st.ranges = []
                if not st.generated:
                    del s.steerings[sid]
            s.changed()

    def _checked_prompt(self, s: Session, max_new_tokens: int) -> list[int]:
        prompt = self._prompt_ids(s)
        if len(prompt) + max_new_tokens > self.limits.max_tokens:
            raise NeuronscopeError(
                f"The conversation would reach {len(prompt) + max_new_tokens} tokens, over the limit of "
                f"{self.limits.max_tokens}; start a new chat or ask for fewer new tokens.")
        return prompt

    def _generation_edits(self, s: Session, prompt_len: int) -> list:
        ivs = []
        for st in self._active(s):
            ranges = [(a, min(b, prompt_len)) for a, b in st.ranges if a < prompt_len]
            positions = sorted({t for a, b in ranges for t in range(a, b)})
            if positions:
                ivs += _clamps(st, positions)
            if st.generated:
                ivs += _clamps(st, "generated")
        return ivs

    @staticmethod
    def _active(s: Session) -> list[Steering]:
        return [st for st in s.steerings.values() if st.enabled]

    def _stream(self, s: Session, prompt: list[int], max_new_tokens: int, temperature: float,
                seed: int | None, previous: list[dict] | None = None) -> Iterator[dict]:
        """Start generating in a thread that finishes (and stores the answer) even if nobody reads the events."""
        q: queue.Queue = queue.Queue()
        ivs = self._generation_edits(s, len(prompt))
        active = [st for st in self._active(s) if st.generated or st.ranges]
        steering_ids = [st.id for st in active if st.generated]
        steered_by = [st.public() for st in active]
        new: list[int] = []

        def on_token(t: int) -> None:
            new.append(t)
            text = self.subject.decode([x for x in new if x not in self.eos])
            with s.lock:
                s.generating = {"text": text, "n_tokens": len(new)}
            q.put(("token", t))

        def work():
            try:
                decode(self.subject, prompt, interventions=ivs, lock=self.model_lock, max_new_tokens=max_new_tokens,
                       temperature=float(temperature), seed=seed, eos=self.eos, on_token=on_token,
                       chunk=self.chunk_tokens, idle_chunk=self.idle_chunk_tokens)
                content_ids = [t for t in new if t not in self.eos]
                with s.lock:
                    s.messages.append(Message("assistant", self.subject.decode(content_ids), ids=content_ids,
                                              steerings=steering_ids, steered_by=steered_by,
                                              previous=list(previous or [])))
                    s.generating = None
                    s.changed()
                    version = s.version
                finish = "eos" if any(t in self.eos for t in new) else "length"
                q.put(("end", {"finish": finish, "version": version}))
            except Exception as exc:  # reported to the client as an error event
                with s.lock:
                    s.generating = None
                q.put(("error", f"Generation failed: {exc}"))

        threading.Thread(target=work, daemon=True, name=f"answer-{s.id[:6]}").start()

        def events() -> Iterator[dict]:
            text = ""
            seen: list[int] = []
            while True:
                kind, val = q.get()
                if kind == "error":
                    yield {"type": "error", "error": val}
                    return
                if kind == "end":
                    break
                seen.append(val)
                if val in self.eos:
                    continue
                full = self.subject.decode([t for t in seen if t not in self.eos])
                delta, text = full[len(text):], full
                yield {"type": "token", "id": val, "text": delta, "token": self.subject.token_strings([val])[0]}
            yield {"type": "done", "text": text, "n_tokens": len(seen), "finish_reason": val["finish"],
                   "version": val["version"], "steered": bool(steering_ids) or bool(ivs)}
        return events()

    # ---- one forward: tokens, top-5, activations ----------------------------------------------------------
    def _analysis_edits(self, s: Session) -> tuple[list, set[int]]:
        r = self.render(s)
        ivs, steered = [], set()
        for st in self._active(s):
            pos = {t for a, b in st.ranges for t in range(a, min(b, len(r["ids"])))}
            if st.generated:
                for k, m in enumerate(s.messages):
                    if m.role == "assistant" and st.id in m.steerings:
                        a, b = r["spans"][k]
                        pos.update(range(a, b))
            if pos:
                ivs += _clamps(st, sorted(pos))
                steered |= pos
        return ivs, steered

    def analysis(self, s: Session) -> dict[str, Any]:
        """One forward of the conversation (with its steerings; in chunks, one lock hold each): tokens, top-5,
        firing neurons. Cached."""
        with s.lock:
            a = s.cache.get("analysis")
            if a is not None:
                return a
            r = self.render(s)
            if not r["ids"]:
                a = {"tokens": [], "rows": [], "mode": "empty"}
                s.cache["analysis"] = a
                return a
            ivs, steered = self._analysis_edits(s)
            run = forward_chunks(self.subject, torch.tensor([r["ids"]]), lock=self.model_lock,
                                 chunk=self.chunk_tokens, idle_chunk=self.idle_chunk_tokens, interventions=ivs,
                                 capture=Capture(layers=None))
            assert run.logits is not None
            logits = run.logits.float()                                            # [T, vocab]
            acts = run.activations()[:, 0].float()                                 # [L, T, N]
            a = self._summarise(r, logits, acts, steered)
            s.cache["analysis"] = a
            return a

    def _summarise(self, r, logits: torch.Tensor, acts: torch.Tensor, steered: set[int]) -> dict[str, Any]:
        ids = r["ids"]
        T = len(ids)
        probs = torch.softmax(logits, -1)
        tp, ti = probs.topk(5, dim=-1)
        own = [None] + probs[torch.arange(T - 1), torch.tensor(ids[1:], dtype=torch.long)].tolist() if T > 1 else [None]
        strs = r["strings"]
        tokens = []
        for t in range(T):
            top5 = []
            if t:  # what the model predicted AT this position (from the tokens before it): this token's rivals
                alts = ti[t - 1].tolist()
                top5 = [{"token": x, "id": i, "prob": p}
                        for x, i, p in zip(self._next_strings(ids[t - 1], alts), alts, tp[t - 1].tolist())]
            tokens.append({"position": t, "id": ids[t], "text": strs[t], "role": r["roles"][t],
                           "message": r["message"][t], "steered": t in steered, "prob": own[t], "top5": top5})
        L, _, N = acts.shape
        norm = self.knowledge.normalise(acts)
        if norm is not None:
            mode = "normalised"
            idx = (norm.abs() > 1).nonzero()
            vals = norm[idx[:, 0], idx[:, 1], idx[:, 2]]
        else:
            mode = "raw"
            k = min(self.limits.raw_per_token, L * N)
            flat = acts.permute(1, 0, 2).reshape(T, L * N)
            top = flat.abs().topk(k, dim=1).indices                               # [T, k]
            pos = torch.arange(T).unsqueeze(1).expand_as(top).reshape(-1)
            idx = torch.stack([top.reshape(-1) // N, pos, top.reshape(-1) % N], dim=1)
            vals = acts[idx[:, 0], idx[:, 1], idx[:, 2]]
        raw = acts[idx[:, 0], idx[:, 1], idx[:, 2]]
        groups: dict[tuple[int, int, str], dict] = {}
        for (l, t, i), v, rv in zip(idx.tolist(), vals.tolist(), raw.tolist()):
            pol = "pos" if rv >= 0 else "neg"
            g = groups.setdefault((l, i, pol), {"layer": l, "neuron": i, "polarity": pol, "positions": [],
                                                "values": [], "raw": []})
            g["positions"].append(t)
            g["values"].append(v)
            g["raw"].append(rv)
        return {"tokens": tokens, "rows": list(groups.values()), "mode": mode}

    def tokens(self, s: Session) -> dict[str, Any]:
        a = self.analysis(s)
        return {"version": s.version, "tokens": a["tokens"], "chat_mode": self.info()["chat_mode"]}

    def _descriptions(self) -> dict[tuple[int, int, str], dict] | None:
        """Every description, read once: {(layer, neuron, polarity): {"text", "score", "interpretable"}}."""
        d = self.knowledge.descriptions
        if d is None:
            return None
        with self._desc_lock:
            if self._desc is None:
                index = {}
                for row in d.all():
                    score = row.get("score")
                    flag = row.get("interpretable")
                    if flag is None:
                        flag = score is not None and float(score) >= INTERPRETABLE_SCORE
                    index[(int(row["layer"]), int(row["neuron"]), str(row["polarity"]))] = {
                        "text": row.get("text"), "score": score, "interpretable": bool(flag)}
                self._desc = index
            return self._desc

    def _meta(self, row: dict) -> dict:
        """Add description, interpretable flag and top decoded tokens to a row (at once: views run concurrently)."""
        if "top_tokens" not in row:
            index = self._descriptions()
            d = index.get((row["layer"], row["neuron"], row["polarity"])) if index is not None else None
            tops = self.knowledge.top_tokens(row["layer"], row["neuron"], row["polarity"])
            row.update(description=d["text"] if d else None, interpretable=bool(d and d["interpretable"]),
                       top_tokens=tops)
        return row

    def _check_range(self, s: Session, start: int | None, end: int | None, T: int) -> tuple[int, int]:
        a = 0 if start is None else start
        b = T if end is None else end
        if not (0 <= a < b <= T) and not (T == 0 and a == 0 and b == 0):
            raise NeuronscopeError(f"The token range [{a}, {b}) is outside the conversation, which has tokens "
                                   f"0 to {T - 1}." if T else "The conversation is empty: there is no token range.")
        return a, b

    def activations(self, s: Session, *, start: int | None = None, end: int | None = None, sort: str = "activation",
                    order: str = "desc", page: int = 0, page_size: int = 50, filter: str = "",
                    polarity: str | None = None, content_only: bool = False,
                    interpretable: bool = False) -> dict[str, Any]:
        """Neurons firing in the token range [start, end): one row per (layer, neuron, polarity), paged.

        `content_only` keeps firings on the messages' own tokens (not the chat template, system prompt or turn
        separators); `interpretable` keeps neurons whose description counts as interpretable (needs descriptions).
        """
        if sort not in SORTS:
            raise NeuronscopeError(f"Unknown sort '{sort}'; use one of {', '.join(SORTS)}.")
        if order not in ("asc", "desc"):
            raise NeuronscopeError("Order must be asc or desc.")
        if polarity is not None:
            check_polarity(polarity)
        if not 1 <= page_size <= self.limits.max_page_size or page < 0:
            raise NeuronscopeError(f"page must be >= 0 and page_size between 1 and {self.limits.max_page_size}.")
        a = self.analysis(s)
        T = len(a["tokens"])
        lo, hi = self._check_range(s, start, end, T)
        if len(filter) > self.limits.max_filter_chars:
            raise NeuronscopeError(f"The filter has {len(filter)} characters; the limit is "
                                   f"{self.limits.max_filter_chars}.")
        needle = filter.strip().lower()
        roles = self.render(s)["roles"]
        index = self._descriptions() if interpretable else None
        view = []
        for row in a["rows"]:
            if polarity and row["polarity"] != polarity:
                continue
            inside = [(t, v) for t, v in zip(row["positions"], row["values"]) if lo <= t < hi
                      and (not content_only or roles[t] in CONTENT_ROLES)]
            if not inside:
                continue
            if index is not None:
                d = index.get((row["layer"], row["neuron"], row["polarity"]))
                if not (d and d["interpretable"]):
                    continue
            if needle:
                self._meta(row)
                hay = " ".join([f"l{row['layer']}/n{row['neuron']}", f"{row['layer']}:{row['neuron']}",
                                row["description"] or "", " ".join(row["top_tokens"]), row["polarity"]]).lower()
                if needle not in hay:
                    continue
            best = max(inside, key=lambda tv: abs(tv[1]))
            view.append((row, best, len(inside)))
        keys = {"activation": lambda x: abs(x[1][1]), "layer": lambda x: (x[0]["layer"], x[0]["neuron"]),
                "neuron": lambda x: (x[0]["neuron"], x[0]["layer"]), "count": lambda x: (x[2], abs(x[1][1]))}
        view.sort(key=keys[sort], reverse=(order == "desc"))
        tints = [0.0] * T
        for row, _, _ in view:
            for t, v in zip(row["positions"], row["values"]):
                if not content_only or roles[t] in CONTENT_ROLES:
                    tints[t] += v
        rows = []
        for row, (t, v), count in view[page * page_size:(page + 1) * page_size]:
            self._meta(row)
            rows.append({"layer": row["layer"], "neuron": row["neuron"], "polarity": row["polarity"],
                         "activation": v, "position": t, "count": count, "description": row["description"],
                         "interpretable": row["interpretable"], "top_tokens": row["top_tokens"],
                         "fires": [{"position": p, "value": x} for p, x in zip(row["positions"], row["values"])]})
        notes = list(self.knowledge.notes)
        if interpretable and index is None:
            notes.insert(0, "No descriptions: every firing neuron is shown (none can be judged interpretable).")
        if a["mode"] == "raw":
            notes.insert(0, f"Not normalised: no corpus statistics, so this shows the {self.limits.raw_per_token} "
                            "strongest raw activations of each token (values are raw activations).")
        return {"version": s.version, "mode": a["mode"], "start": lo, "end": hi, "total": len(view), "page": page,
                "page_size": page_size, "rows": rows, "token_sums": tints, "notes": notes,
                "normalised_by": self._normalised_by() if a["mode"] == "normalised" else None}

    # ---- attribution --------------------------------------------------------------------------------------
    def attribution(self, s: Session, position: int, token_id: int | None = None, *, page: int = 0,
                    page_size: int = 50) -> dict[str, Any]:
        """The neurons that caused the token at `position` (top 1000 by |a * dp/da|), once per state, cached."""
        if not 1 <= page_size <= self.limits.max_page_size or page < 0:
            raise NeuronscopeError(f"page must be >= 0 and page_size between 1 and {self.limits.max_page_size}.")
        res = self._attribution(s, position, token_id)
        out = {k: v for k, v in res.items() if k != "rows"}
        page_rows = [self._meta(row) for row in res["rows"][page * page_size:(page + 1) * page_size]]
        out.update(version=s.version, total=len(res["rows"]), page=page, page_size=page_size, rows=page_rows,
                   notes=list(self.knowledge.notes))
        return out

    def _attribution(self, s: Session, position: int, token_id: int | None) -> dict[str, Any]:
        """The whole attribution result of one state (computed once, cached in the session)."""
        with s.lock:
            r = self.render(s)
            T = len(r["ids"])
            if not 1 <= position < T:
                raise NeuronscopeError(f"Position {position} has no token to explain: pick a token at positions 1 "
                                       f"to {T - 1}." if T > 1 else "The conversation is too short to attribute.")
            if token_id is not None and not 0 <= token_id < self.subject.vocab_size:
                raise NeuronscopeError(f"Token id {token_id} is out of range: the vocabulary has "
                                       f"{self.subject.vocab_size} tokens.")
            key = ("attr", position, token_id)
            res = s.cache.get(key)
            if res is None:
                ivs, _ = self._analysis_edits(s)
                att = attribute_chunked(self.subject, torch.tensor([r["ids"]]), position, token_id,
                                        top=self.limits.attribution_top, lock=self.model_lock,
                                        chunk=self.grad_chunk_tokens, idle_chunk=self.idle_chunk_tokens,
                                        interventions=ivs)
                strs = self.display_tokens(r["ids"])
                rows = []
                for row in att.rows():
                    pol = "pos" if row["activation"] >= 0 else "neg"
                    row.update(polarity=pol, token=strs[row["position"]],
                               normalised=self.knowledge.normalise_one(row["layer"], row["neuron"], row["activation"]))
                    rows.append(row)
                sums = [0.0] * T
                for row in rows:
                    sums[row["position"]] += row["score"]
                res = s.cache[key] = {"target_position": position, "target_token": att.target_token,
                                      "target_text": self.subject.token_strings([att.target_token])[0],
                                      "probability": att.probability, "rows": rows, "position_scores": sums}
        return res

    # ---- neurons, concepts, clusters -----------------------------------------------------------------------
    def _check_neuron(self, layer: int, neuron: int) -> None:
        check_neuron(layer, neuron, self.subject.n_layers, self.subject.n_neurons)

    def neuron(self, layer: int, neuron: int, n_exemplars: int = 10, marks: bool = True) -> dict[str, Any]:
        """A neuron's decodes, description and top exemplars (with each token's normalised activation).

        The marks (the neuron's activation at every token of each exemplar window) need a forward of the windows;
        `marks=False` answers without it (no model call), so a page can show the detail at once and the marks
        after. Results are cached per (neuron, n_exemplars, marks).
        """
        self._check_neuron(layer, neuron)
        if not 0 <= n_exemplars <= self.limits.max_exemplars:
            raise NeuronscopeError(f"n_exemplars must be between 0 and {self.limits.max_exemplars}.")
        key = (layer, neuron, n_exemplars, bool(marks))
        with self._desc_lock:
            hit = self._neuron_cache.get(key)
        if hit is not None:
            return hit
        out = self._neuron(layer, neuron, n_exemplars, marks)
        with self._desc_lock:
            if len(self._neuron_cache) >= 512:
                self._neuron_cache.pop(next(iter(self._neuron_cache)))
            self._neuron_cache[key] = out
        return out

    def _neuron(self, layer: int, neuron: int, n_exemplars: int, marks: bool) -> dict[str, Any]:
        k = self.knowledge
        decodes, source = k.decodes(layer, neuron)
        found = {pol: k.exemplars(layer, neuron, pol, n_exemplars) if n_exemplars and k.stats is not None else []
                 for pol in ("pos", "neg")}
        if marks:
            every = [e for pol in ("pos", "neg") for e in found[pol]]
            for e, acts in zip(every, self._window_acts([list(e["token_ids"]) for e in every], layer, neuron)):
                e["acts"] = acts
        exemplars = {}
        for pol in ("pos", "neg"):
            ex = []
            for e in found[pol]:
                acts = e.get("acts")
                marked = [k.normalise_one(layer, neuron, x) for x in acts] if acts else None
                ex.append({"activation": float(e["activation"]), "normalised": k.normalise_one(
                    layer, neuron, float(e["activation"])), "position": int(e["position"]),
                    "tokens": self.display_tokens(list(e["token_ids"])) if e.get("token_ids") else
                    list(e["tokens"]), "text": e.get("text", ""), "marks": marked})
            exemplars[pol] = ex
        return {"layer": layer, "neuron": neuron, "decodes": decodes, "decodes_source": source,
                "descriptions": {p: k.description(layer, neuron, p) for p in ("pos", "neg")},
                "exemplars": exemplars, "quantiles": k.quantiles_of(layer, neuron),
                "quantile_marks": self._level_marks(), "normalised_by": self._normalised_by(),
                "notes": list(k.notes)}

    def _window_acts(self, windows: list[list[int]], layer: int, neuron: int) -> list[list[float]]:
        """Neuron (layer, neuron)'s activation at every token of each exemplar window: forwards that stop after
        `layer` (the layers above cannot change it), windows of one length batched so that a lock hold runs about
        one chunk of tokens (`decoding.forward_chunks`)."""
        out: list[list[float] | None] = [None] * len(windows)
        by_len: dict[int, list[int]] = {}
        for j, w in enumerate(windows):
            if w:
                by_len.setdefault(len(w), []).append(j)
        for n, js in by_len.items():
            per_call = self.model_lock.chunk_size(self.chunk_tokens, self.idle_chunk_tokens)
            rows = max(1, min(len(js), per_call // n))
            for a in range(0, len(js), rows):
                part = js[a:a + rows]
                run = forward_chunks(self.subject, torch.tensor([windows[j] for j in part]), lock=self.model_lock,
                                     chunk=max(1, self.chunk_tokens // len(part)),
                                     idle_chunk=max(1, self.idle_chunk_tokens // len(part)),
                                     capture=Capture(layers=[layer], neurons=[neuron]), stop_after=layer)
                acts = run.activations()[0, :, :, 0].float()
                for j, row in zip(part, acts):
                    out[j] = row.tolist()
        return [x if x is not None else [] for x in out]

    def _level_marks(self) -> dict[str, str] | None:
        """{level: mark} for the statistics' levels the corpus does not resolve (stats.levels), else None."""
        st = self.knowledge.stats
        info = getattr(st, "level_info", None) if st is not None else None
        if info is None:
            return None
        out = {}
        for lv in st.levels:
            mark = info.get(lv).mark
            if mark:
                out[str(lv)] = mark
        return out

    def _normalised_by(self) -> str | None:
        """How activations are normalised, e.g. "positive / q(1-1e-05), negative / |q(1e-05)|" (+ its mark)."""
        st = self.knowledge.stats
        if st is None or not hasattr(st, "norm_levels"):
            return None
        from ..stats.levels import fmt_level
        hi, lo = st.norm_levels()
        text = f"positive / q({fmt_level(hi)}), negative / |q({fmt_level(lo)})|"
        marks = {m for m in (st.level_info.get(hi).mark, st.level_info.get(lo).mark) if m}
        return text + (f" ({'; '.join(sorted(marks))})" if marks else "")

    def concepts(self, query: str, k: int = 50) -> dict[str, Any]:
        """Neurons for a concept, best first (by meaning when the atlas has the describe index, else by text)."""
        if not 1 <= k <= self.limits.max_steer_neurons:
            raise NeuronscopeError(f"k must be between 1 and {self.limits.max_steer_neurons}.")
        if len(query) > self.limits.max_concept_chars:
            raise NeuronscopeError(f"The concept has {len(query)} characters; the limit is "
                                   f"{self.limits.max_concept_chars}.")
        return {"query": query, "results": self._search(query, k), "notes": list(self.knowledge.notes)}

    def _search(self, query: str, k: int) -> list[dict]:
        """Semantic search of the atlas's neuron index (atlas.search.semantic_search) when it has one, else the
        decode + description text search of `Knowledge.search`."""
        key = ("search", query.strip().lower(), int(k))
        with self._desc_lock:
            hit = self._neuron_cache.get(key)
        if hit is not None:
            return [dict(r) for r in hit]
        rows = self._search_uncached(query, k)
        with self._desc_lock:
            self._neuron_cache[key] = [dict(r) for r in rows]
        return rows

    def _search_uncached(self, query: str, k: int) -> list[dict]:
        folder = self.knowledge.atlas_dir
        if folder and self._has_index():
            from ..atlas.search import semantic_search
            try:
                hits = semantic_search(folder, query, k=k)
            except NeuronscopeError:
                hits = None
            if hits is not None:
                return [{"layer": int(h["layer"]), "neuron": int(h["neuron"]), "polarity": str(h["polarity"]),
                         "score": float(h["score"]), "tokens": list(h.get("tokens") or []), "source": "semantic",
                         "description": h.get("description")} for h in hits]
        return self.knowledge.search(query, k=k)

    def _has_index(self) -> bool:
        if not hasattr(self, "_index_ok"):
            try:
                from ..describe.index import load_index
                self._index_ok = load_index(self.knowledge.atlas_dir) is not None
            except (ImportError, NeuronscopeError, OSError):
                self._index_ok = False
        return self._index_ok

    def warm(self) -> None:
        """Do once what the first click of each kind would do (read the descriptions, vocabulary, quantiles and
        exemplar tables; load the embedding index and embedder, run one semantic search and one clustering; one
        short forward with hooks), so the first click is as fast as the next; `neuronscope serve` runs it in the
        background. Nothing is added to the caches of views."""
        self._descriptions()
        k = self.knowledge
        steps = [lambda: k.top_tokens(0, 0, "pos"), lambda: k.normalise_one(0, 0, 1.0), lambda: k.decodes(0, 0),
                 lambda: k.quantiles_of(0, 0), lambda: k.exemplars(0, 0, "pos", 1), self._level_marks,
                 self._normalised_by, lambda: self.display_tokens(self.subject.encode("warm up")[0].tolist()),
                 lambda: forward_chunks(self.subject, self.subject.encode("warm up")[0], lock=self.model_lock,
                                        chunk=self.chunk_tokens, capture=Capture(layers=None))]
        if k.atlas_dir and self._has_index():
            from ..atlas.search import semantic_search
            steps.append(lambda: semantic_search(k.atlas_dir, "the", k=5))
        steps.append(lambda: k.clusters([(0, i, "pos") for i in range(min(8, self.subject.n_neurons))]))
        for step in steps:
            try:
                step()
            except NeuronscopeError:  # a part the atlas lacks: its views say so when asked
                pass

    def clusters(self, s: Session, start: int | None = None, end: int | None = None, *, max_neurons: int = 300,
                 content_only: bool = False, interpretable: bool = False, sort: str = "activation",
                 position: int | None = None) -> dict[str, Any]:
        """The active concepts: neurons firing in [start, end) grouped into named clusters of related neurons.

        Each cluster has its size, its summed activation (sum over members of |normalised activation| at their
        firing tokens in the range) and, with `position`, its attribution to that token (sum of the members'
        |a * dp/da| scores, any position); `sort` orders by "activation" or "attribution" (needs `position`).
        """
        if sort not in ("activation", "attribution", "size"):
            raise NeuronscopeError(f"Unknown cluster sort '{sort}'; use activation, attribution or size.")
        if sort == "attribution" and position is None:
            raise NeuronscopeError("Sorting clusters by attribution needs a token: give its position.")
        view = self.activations(s, start=start, end=end, page_size=min(max_neurons, self.limits.max_page_size),
                                content_only=content_only, interpretable=interpretable)
        lo, hi = view["start"], view["end"]
        key = ("clusters", lo, hi, content_only, interpretable, max_neurons)
        with s.lock:
            base = s.cache.get(key)
        if base is None:
            neurons = [(r["layer"], r["neuron"], r["polarity"]) for r in view["rows"]]
            try:
                found, method = self.knowledge.clusters(neurons)
            except NeuronscopeError as exc:  # e.g. no embedding index and no embedder: say so, show no clusters
                found, method = [], "unavailable"
                view["notes"].insert(0, f"No clusters: {exc}")
            act = {(r["layer"], r["neuron"], r["polarity"]): sum(abs(f["value"]) for f in r["fires"]
                                                                 if lo <= f["position"] < hi)
                   for r in view["rows"]}
            out = []
            for c in found:
                members = [[int(m[0]), int(m[1]), str(m[2]) if len(m) > 2 else "pos"] for m in c["members"]]
                out.append({"name": c["name"], "members": members, "tokens": list(c.get("tokens") or []),
                            "size": len(members), "activation": float(sum(act.get(tuple(m), 0.0) for m in members))})
            base = {"method": method, "n_neurons": len(neurons), "clusters": out}
            with s.lock:
                s.cache[key] = base
        clusters = [dict(c, attribution=None) for c in base["clusters"]]
        if position is not None:
            rows = self._attribution(s, position, None)["rows"]
            score: dict[tuple[int, int], float] = {}
            for r in rows:
                score[(r["layer"], r["neuron"])] = score.get((r["layer"], r["neuron"]), 0.0) + abs(r["score"])
            for c in clusters:
                c["attribution"] = float(sum(score.get((m[0], m[1]), 0.0) for m in c["members"]))
        by = {"activation": lambda c: -c["activation"], "size": lambda c: (-c["size"], -c["activation"]),
              "attribution": lambda c: -(c["attribution"] or 0.0)}[sort]
        clusters.sort(key=by)
        return {"version": s.version, "method": base["method"], "n_neurons": base["n_neurons"], "sort": sort,
                "position": position, "clusters": clusters, "notes": view["notes"]}

    # ---- steering -----------------------------------------------------------------------------------------
    def add_steering(self, s: Session, *, mode: str, concept: str | None = None,
                     neurons: list[list[int]] | None = None, strength: float = 0.75, value: float | None = None,
                     n_neurons: int | None = None, ranges: list[list[int]] | None = None,
                     generated: bool = True, label: str | None = None, enabled: bool = True) -> dict[str, Any]:
        """Steer a concept (its neurons found by search) or explicit neurons; `label` names it (e.g. a cluster)."""
        L = self.limits
        if label is not None and len(label) > L.max_concept_chars:
            raise NeuronscopeError(f"The label has {len(label)} characters; the limit is {L.max_concept_chars}.")
        if len(s.steerings) >= L.max_steerings:
            raise NeuronscopeError(f"A session holds at most {L.max_steerings} steerings; remove one first.")
        if ranges is not None and len(ranges) > L.max_ranges:
            raise NeuronscopeError(f"A steering has at most {L.max_ranges} token ranges, got {len(ranges)}.")
        if mode not in MODES:
            raise NeuronscopeError(f"Unknown steering mode '{mode}'; use strengthen, suppress or clamp.")
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0 <= strength <= L.max_strength):
            raise NeuronscopeError(f"Strength must be a finite number between 0 and {L.max_strength}.")
        if mode == "clamp":
            if value is None or not math.isfinite(value) or abs(value) > L.max_clamp:
                raise NeuronscopeError(f"A clamp needs a finite value between -{L.max_clamp:g} and {L.max_clamp:g}.")
        n = n_neurons if n_neurons is not None else (50 if mode == "strengthen" else 500)
        if not 1 <= n <= L.max_steer_neurons:
            raise NeuronscopeError(f"The number of neurons must be between 1 and {L.max_steer_neurons}.")
        if (concept is None or not concept.strip()) == (not neurons):
            raise NeuronscopeError("Give either a concept or a list of neurons to steer (not both, not neither).")
        with s.lock:
            T = len(self.render(s)["ids"])
            clean_ranges = []
            for rg in ranges or []:
                if len(rg) != 2:
                    raise NeuronscopeError("Each token range is a pair [start, end).")
                a, b = int(rg[0]), int(rg[1])
                if not 0 <= a < b <= T:
                    raise NeuronscopeError(f"The token range [{a}, {b}) is outside the conversation "
                                           f"({T} tokens).")
                clean_ranges.append((a, b))
            if not clean_ranges and not generated:
                raise NeuronscopeError("Choose where to steer: prompt token ranges and/or the generated tokens.")
            if neurons:
                picked = []
                for nrn in neurons[:L.max_steer_neurons]:
                    if len(nrn) not in (2, 3):
                        raise NeuronscopeError("Each neuron is [layer, neuron] or [layer, neuron, polarity].")
                    l, i = int(nrn[0]), int(nrn[1])
                    self._check_neuron(l, i)
                    pol = "pos"
                    if len(nrn) == 3:
                        pol = check_polarity({0: "pos", 1: "neg"}.get(nrn[2], nrn[2])
                                             if not isinstance(nrn[2], str) else nrn[2])
                    picked.append((l, i, pol))
                if len(neurons) > L.max_steer_neurons:
                    raise NeuronscopeError(f"At most {L.max_steer_neurons} neurons can be steered at once.")
            else:
                found = self._search(concept, n)
                if not found:
                    raise NeuronscopeError(f"No neurons found for the concept '{concept}'.")
                picked = [(r["layer"], r["neuron"], r["polarity"]) for r in found[:n]]
            vals = []
            for l, i, pol in picked:
                if mode == "suppress":
                    v = 0.0
                elif mode == "clamp":
                    v = float(value)
                else:
                    v = self.knowledge.strengthen_value(l, i, pol, strength)
                vals.append((l, i, pol, v))
            s.n_steerings_made += 1
            st = Steering(id=f"st{s.n_steerings_made}", mode=mode, concept=concept.strip() if concept else None,
                          strength=float(strength) if mode == "strengthen" else None, neurons=vals,
                          ranges=clean_ranges, generated=bool(generated), enabled=bool(enabled),
                          label=label.strip() if label and label.strip() else None)
            while st.id in s.steerings:
                st.id += "x"
            s.steerings[st.id] = st
            s.changed()
            return st.public()

    def remove_steering(self, s: Session, steering_id: str) -> bool:
        with s.lock:
            if s.steerings.pop(steering_id, None) is None:
                return False
            s.changed()
            return True

    def set_steering(self, s: Session, steering_id: str, enabled: bool) -> dict[str, Any] | None:
        """Switch a steering off (kept, not applied) or on again; None if there is no such steering."""
        with s.lock:
            st = s.steerings.get(steering_id)
            if st is None:
                return None
            if st.enabled != bool(enabled):
                st.enabled = bool(enabled)
                s.changed()
            return st.public()

    def state(self, s: Session) -> dict[str, Any]:
        with s.lock:
            r = self.render(s)
            return {"session_id": s.id, "version": s.version, "n_tokens": len(r["ids"]),
                    "messages": [{"role": m.role, "content": m.content, "steered": bool(m.steerings),
                                  "start": r["spans"][k][0], "end": r["spans"][k][1], "steered_by": m.steered_by,
                                  "previous": m.previous}
                                 for k, m in enumerate(s.messages)],
                    "steerings": [st.public() for st in s.steerings.values()],
                    "generating": dict(s.generating) if s.generating is not None else None,
                    "fingerprint": self.subject.fingerprint}

    # ---- export / import ----------------------------------------------------------------------------------
    def export(self, s: Session) -> dict[str, Any]:
        """The session as JSON: conversation (with the exact answer ids), steerings, model fingerprint."""
        with s.lock:
            return {"format": EXPORT_FORMAT,
                    "model": {"name": self.subject.name, "fingerprint": self.subject.fingerprint},
                    "messages": [{"role": m.role, "content": m.content, "ids": m.ids, "steerings": list(m.steerings),
                                  "steered_by": m.steered_by, "previous": m.previous} for m in s.messages],
                    "steerings": [st.public() for st in s.steerings.values()],
                    "n_steerings_made": s.n_steerings_made}

    def import_session(self, s: Session, data: dict[str, Any]) -> dict[str, Any]:
        """Replace an idle session's conversation and steerings by an export of this same model (validated)."""
        L = self.limits
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise NeuronscopeError(f"This is not a Monitor session export (format '{EXPORT_FORMAT}' expected).")
        fp = (data.get("model") or {}).get("fingerprint")
        if fp != self.subject.fingerprint:
            raise NeuronscopeError(f"The session was exported from other weights (fingerprint {str(fp)[:40]}); "
                                   f"this server runs {self.subject.name} ({self.subject.fingerprint}).")
        msgs = data.get("messages") or []
        if not isinstance(msgs, list):
            raise NeuronscopeError("The export's messages must be a list.")
        out: list[Message] = []
        for k, m in enumerate(msgs):
            role = m.get("role") if isinstance(m, dict) else None
            if role != ("user" if k % 2 == 0 else "assistant"):
                raise NeuronscopeError(f"Message {k} must be a {'user' if k % 2 == 0 else 'assistant'} turn.")
            content = m.get("content")
            if not isinstance(content, str) or len(content) > L.max_message_chars * 4:
                raise NeuronscopeError(f"Message {k} has no text or is over {L.max_message_chars * 4} characters.")
            ids = m.get("ids")
            if ids is not None:
                if not (isinstance(ids, list) and all(isinstance(t, int) and 0 <= t < self.subject.vocab_size
                                                      for t in ids)):
                    raise NeuronscopeError(f"Message {k} has token ids outside the vocabulary.")
            out.append(Message(role, content, ids=ids, steerings=[str(x) for x in m.get("steerings") or []],
                               steered_by=list(m.get("steered_by") or []), previous=list(m.get("previous") or [])))
        steer = data.get("steerings") or []
        if not isinstance(steer, list) or len(steer) > L.max_steerings:
            raise NeuronscopeError(f"The export holds more than {L.max_steerings} steerings.")
        with s.lock:
            self._check_idle(s)
            old = (s.messages, s.steerings, s.n_steerings_made)
            s.messages, s.steerings = out, {}
            try:
                n_tokens = len(self.render(s)["ids"]) if out else 0
                if n_tokens > L.max_tokens:
                    raise NeuronscopeError(f"The conversation has {n_tokens} tokens, over the limit of "
                                           f"{L.max_tokens}.")
                for st in steer:
                    if not isinstance(st, dict):
                        raise NeuronscopeError("Each steering is an object.")
                    neurons = st.get("neurons") or []
                    if not isinstance(neurons, list) or not neurons or len(neurons) > L.max_steer_neurons:
                        raise NeuronscopeError(f"Each steering needs 1 to {L.max_steer_neurons} neurons.")
                    mode = st.get("mode")
                    vals = []
                    for n in neurons:
                        l, i, pol = int(n["layer"]), int(n["neuron"]), str(n.get("polarity", "pos"))
                        self._check_neuron(l, i)
                        check_polarity(pol)
                        v = float(n["value"])
                        if not math.isfinite(v) or abs(v) > max(L.max_clamp, 1e6):
                            raise NeuronscopeError("A steering value is not a finite number.")
                        vals.append((l, i, pol, v))
                    if mode not in MODES:
                        raise NeuronscopeError(f"Unknown steering mode '{str(mode)[:20]}'.")
                    ranges = [(int(a), int(b)) for a, b in st.get("ranges") or []]
                    if any(not 0 <= a < b <= n_tokens for a, b in ranges):
                        raise NeuronscopeError("A steering's token range is outside the imported conversation.")
                    sid = str(st.get("id") or f"st{len(s.steerings) + 1}")[:40]
                    strength = st.get("strength")
                    s.steerings[sid] = Steering(
                        id=sid, mode=mode, concept=st.get("concept"), label=st.get("label"),
                        strength=float(strength) if strength is not None else None, neurons=vals, ranges=ranges,
                        generated=bool(st.get("generated", True)), enabled=bool(st.get("enabled", True)))
            except NeuronscopeError:
                s.messages, s.steerings, s.n_steerings_made = old
                s.changed()
                raise
            except (KeyError, TypeError, ValueError) as exc:
                s.messages, s.steerings, s.n_steerings_made = old
                s.changed()
                raise NeuronscopeError(f"The export is malformed ({type(exc).__name__}: {str(exc)[:80]}).") from None
            s.n_steerings_made = max(int(data.get("n_steerings_made") or 0), len(s.steerings))
            s.changed()
        return self.state(s)


def _clamps(st: Steering, positions) -> list[Clamp]:
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for l, i, _, v in st.neurons:
        by_layer.setdefault(l, []).append((i, v))
    out = []
    for l, items in by_layer.items():
        dedup = dict(items)
        out.append(Clamp(l, list(dedup), positions=positions, value=list(dedup.values())))
    return out
