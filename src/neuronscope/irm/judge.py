"""An offline judge of tone in generated text: per-emotion lexicon rates and VADER sentiment, with a recorded version.

    judge = Judge()                        # built-in emotion lexicon + vaderSentiment (MIT)
    judge.score("I am so sad and lonely.") # {'sadness': 0.4, 'joy': 0.0, ..., 'vader_compound': -0.75, 'words': 5}
    judge.info()                           # name, versions and lexicon digest, saved next to every judged result

Emotion rates are the share of an answer's words that belong to an emotion's word list. The built-in lexicon is
neuronscope's own short hand-made list per emotion (Plutchik's eight, stems marked with '*'), so that the judge is
free to ship; `Judge(lexicon="nrc")` uses the NRC emotion lexicon through the optional `nrclex` package instead
(`pip install neuronscope[nrc]`; the NRC lexicon is licensed for research use only, so it is never a default).
Sentiment is VADER's compound score in [-1, 1] (Hutto & Gilbert 2014, `vaderSentiment`, MIT).
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Any, Sequence

from ..errors import NeuronscopeError

# Plutchik's opposite pairs: "the opposite emotion must not rise" is read against this table.
OPPOSITE = {"joy": "sadness", "sadness": "joy", "anger": "fear", "fear": "anger", "trust": "disgust",
            "disgust": "trust", "anticipation": "surprise", "surprise": "anticipation"}

_LEXICON_TEXT = {
    "anger": """angry anger angrily angered furious furiously fury rage raging enraged mad madder irritat* annoy*
        hate hated hates hating hatred hostile hostility outrage* livid resent* bitter bitterly bitterness
        infuriat* irate wrath yell yelled yelling yells scream screamed screaming shout shouted shouting snarl*
        temper frustrat* aggravat* disgusted grr damn damned stupid idiot* idiotic ridiculous fed-up sick-of
        seeth* fum* grumpy grouch* cranky vengeance revenge hostile attack* fight* fought punch* slam* smash*
        kill* destroy* curse* cursing insult* offend* offensive pathetic useless nonsense awful terrible""",
    "sadness": """sad sadly sadder saddest sadness sorrow* unhappy unhappiness cry cried cries crying tear tears tearful
        weep* wept grief griev* mourn* depress* despair* hopeless* heartbroken heartbreak* heartache lonely
        loneliness alone miserable misery gloom* melanchol* sorry regret* lost loss lose losing pain painful
        hurt hurts hurting suffer* lament* dismal bleak empty emptiness broken abandon* forlorn desolate
        downcast dejected sob sobbed sobbing wail* ache aching tragic tragedy dead death die died dying grave
        funeral farewell goodbye missed miss missing longing yearn* weary tired darkness dark gray grey
        disappoint* upset glum blue sigh* helpless worthless shame* guilt* cold""",
    "joy": """happy happily happier happiest happiness joy joyful joyous joyfully glad gladly delight* cheer*
        cheerful smile* smiling smiled laugh* laughing laughter fun funny love loved loves lovely loving
        wonderful great amazing awesome excit* thrill* fantastic marvelous marvellous beautiful pleasure
        pleasant pleased enjoy* celebrat* bliss* ecstatic elated grateful thankful yay hooray hurray
        glee* gleeful merry jolly sunny bright warm warmth playful proud hope hopeful exciting excellent
        perfect brilliant kind friendly sweet treasure* blessed grin* giggl* dance* dancing sing* sang""",
    "fear": """afraid fear fears feared fearful frighten* fright scare* scary terrified terrify* terror horror
        horrible horrified panic* anxious anxiety worry worried worries worrying nervous dread* alarm* threat*
        danger* dangerous tremble* trembling shiver* shaking shook creepy eerie spooky haunt* nightmare* ghost*
        monster* dark darkness hide hid hiding flee fled escape* risk* unsafe uneasy tense scream* """,
    "disgust": """disgust* gross yuck yucky nasty filth* dirty vile revolting repuls* sicken* nause* rotten
        stink* stank smelly foul grime* slime slimy putrid loath* abhor* hideous ugly contempt""",
    "surprise": """surprise* surprising surprised amaz* astonish* astound* stun* shock* startl* unexpected*
        sudden suddenly wow whoa gasp* incredible unbelievable wonder""",
    "trust": """trust* trusted honest honesty loyal loyalty faithful reliable depend* safe safety secure
        confident confidence believe* faith friend* friendship support* protect* care careful caring""",
    "anticipation": """anticipat* expect* await* eager* hope* soon tomorrow plan* prepar* ready wait waiting
        looking-forward curious excit* upcoming future""",
}


@lru_cache(maxsize=1)
def builtin_lexicon() -> dict[str, tuple[frozenset[str], tuple[str, ...]]]:
    """emotion -> (exact words, stems) of the built-in lexicon."""
    out = {}
    for emo, text in _LEXICON_TEXT.items():
        words = text.split()
        out[emo] = (frozenset(w for w in words if not w.endswith("*")),
                    tuple(sorted(w[:-1] for w in words if w.endswith("*"))))
    return out


def lexicon_digest() -> str:
    h = hashlib.sha256()
    for emo in sorted(_LEXICON_TEXT):
        h.update(emo.encode())
        h.update(" ".join(sorted(_LEXICON_TEXT[emo].split())).encode())
    return h.hexdigest()[:16]


_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")


def words(text: str) -> list[str]:
    """Lower-case words of a text (letters, inner apostrophes and hyphens)."""
    return _WORD.findall(text.lower())


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that already occurred earlier in the same text (0 = no repetition)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    rep = 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams)


class Judge:
    """Scores texts for emotions (lexicon word rates) and sentiment (VADER); offline and deterministic."""

    def __init__(self, lexicon: str = "builtin"):
        if lexicon not in ("builtin", "nrc"):
            raise NeuronscopeError(f"Unknown judge lexicon '{lexicon}'; use builtin or nrc.")
        self.lexicon = lexicon
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise NeuronscopeError("The judge needs vaderSentiment: pip install vaderSentiment.") from None
        self._vader = SentimentIntensityAnalyzer()
        self._nrc = None
        if lexicon == "nrc":
            try:
                from nrclex import NRCLex
            except ImportError:
                raise NeuronscopeError("The NRC judge needs the optional nrclex package (research-use licence): "
                                       "pip install 'neuronscope[nrc]'.") from None
            self._nrc = NRCLex
        self.emotions = tuple(sorted(_LEXICON_TEXT))

    def info(self) -> dict[str, Any]:
        """What judged: recorded next to every result."""
        from importlib.metadata import PackageNotFoundError, version

        def ver(pkg: str) -> str | None:
            try:
                return version(pkg)
            except PackageNotFoundError:
                return None
        d: dict[str, Any] = {"name": f"neuronscope-judge/{self.lexicon}", "sentiment": "vaderSentiment",
                             "vaderSentiment": ver("vaderSentiment"), "emotions": list(self.emotions)}
        if self.lexicon == "builtin":
            d["lexicon"] = "neuronscope built-in v1"
            d["lexicon_sha256_16"] = lexicon_digest()
        else:
            d["lexicon"] = "NRC Emotion Lexicon via nrclex (research use only)"
            d["nrclex"] = ver("nrclex")
        return d

    def emotion_counts(self, ws: Sequence[str]) -> dict[str, int]:
        counts = dict.fromkeys(self.emotions, 0)
        if self._nrc is not None:
            raw = self._nrc(" ".join(ws)).raw_emotion_scores
            return {e: int(raw.get(e, 0)) for e in self.emotions}
        for emo, (exact, stems) in builtin_lexicon().items():
            counts[emo] = sum(1 for w in ws if w in exact or w.startswith(stems))
        return counts

    def score(self, text: str) -> dict[str, float]:
        """Emotion word rates, VADER scores, word count and 3-gram repetition rate of one text."""
        ws = words(text)
        n = len(ws)
        counts = self.emotion_counts(ws)
        v = self._vader.polarity_scores(text)
        out: dict[str, float] = {e: (counts[e] / n if n else 0.0) for e in self.emotions}
        out.update(vader_compound=float(v["compound"]), vader_pos=float(v["pos"]), vader_neg=float(v["neg"]),
                   words=float(n), repetition=repetition_rate(text))
        return out

    def score_many(self, texts: Sequence[str]) -> list[dict[str, float]]:
        return [self.score(t) for t in texts]


def check_emotion(judge: Judge, emotion: str) -> str:
    if emotion not in judge.emotions:
        raise NeuronscopeError(f"Unknown emotion '{emotion}'; the judge knows {', '.join(judge.emotions)}.")
    return emotion


__all__ = ["Judge", "OPPOSITE", "repetition_rate", "words", "builtin_lexicon", "lexicon_digest", "check_emotion"]
