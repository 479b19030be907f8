"""Free text understood by meaning: a rules fast path here, the text model for the rest.

A message without a command goes, in order:

1. :func:`classify_rules` (pure, instant, in the bot process): cue words in the languages our
   communities write in, matched with typo tolerance ("pictur", "storry", "brainstrom"). A
   clear cue routes the message at once with a confidence from how clear it was.
2. Nothing clear: an ``understand`` job. A worker scores every intent's label with the text
   model (:func:`model_messages` and :data:`LABEL_WORDS` are what it reads, the scoring lives in
   ``workers/``, which owns the model) and combines that with the rules' weak evidence
   (:func:`combine`).
3. Still unsure (confidence under :data:`ASK_BELOW`): the person is asked with buttons ("A
   picture / A text / A story?") instead of being guessed at.

The decision and its confidence are kept in the job (``params["understanding"]``), and "why
this?" shows them.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ASK_BELOW",
    "ASK_CHOICES",
    "INTENTS",
    "LABEL_WORDS",
    "Understanding",
    "classify_rules",
    "combine",
    "model_messages",
    "rule_scores",
]

INTENTS = ("imagine", "write", "story", "brainstorm", "refine", "help")
#: Under this confidence the bot asks instead of guessing.
ASK_BELOW = 0.5
#: What the clarifying question offers, as (intent, button label).
ASK_CHOICES = (("imagine", "🖼 A picture"), ("write", "✍️ A text"), ("story", "📖 A story"),
               ("brainstorm", "💡 Ideas"))
#: The rules route on their own from this score up (one clear cue scores 1.0).
RULES_ROUTE_AT = 1.0
#: Fuzzy matching: a word this similar to a cue word counts as that word (typos).
FUZZY_RATIO = 0.84
FUZZY_MIN_CHARS = 4


@dataclass(frozen=True, slots=True)
class Understanding:
    """What a free-text message is after, how sure we are, and who decided."""

    intent: str
    confidence: float
    source: str  # "rules" | "model" | "person" (picked from the question's buttons)
    prompt: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["confidence"] = round(self.confidence, 3)
        data["scores"] = {k: round(v, 3) for k, v in self.scores.items()}
        return data

    def describe(self) -> str:
        """For "why this?": plain words about the routing decision."""
        how = {"rules": "from its wording", "model": "by the text model",
               "person": "because you picked it"}.get(self.source, self.source)
        return f"I read your message as a {self.intent} request {how} ({self.confidence:.0%} sure)"


def _fold(text: str) -> str:
    """Lower case without accents, so "écris" matches "ecris" and "Märchen" "marchen"."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


# Cue words per intent. Single words match whole words, fuzzily from FUZZY_MIN_CHARS letters;
# phrases (with a space) and CJK cues match as substrings of the folded text.
_CUES: dict[str, tuple[str, ...]] = {
    "imagine": (
        "draw", "drawing", "paint", "painting", "sketch", "picture", "pic", "image", "photo",
        "illustration", "illustrate", "render", "portrait", "wallpaper", "logo", "artwork",
        "poster", "icon", "avatar", "pfp", "imagine", "visualize", "visualise", "doodle",
        "dessin", "dessine", "dessiner", "peins", "peindre", "bild", "zeichne", "zeichnung",
        "male", "gemalde", "foto", "dibuja", "dibujo", "imagen", "pinta", "dipingi", "disegna",
        "disegno", "immagine", "desenhe", "desenho", "imagem", "pinte", "teken", "tekening",
        "afbeelding", "plaatje", "schilder", "нарисуй", "картинку", "картинка", "рисунок", "изображение",
        "narysuj", "obrazek", "rysunek", "obraz", "zdjecie",
        "描いて", "絵", "画像", "イラスト",
        # Words only picture prompts carry: styles, resolutions, framing.
        "4k", "8k", "hd", "photorealistic", "realistic", "shot of", "close-up", "closeup",
        "watercolor", "watercolour", "oil painting", "pixel art", "anime", "line art",
        "3d render", "cinematic", "in the style of", "show me", "look like", "looks like",
    ),
    "write": (
        "write", "poem", "haiku", "limerick", "slogan", "letter", "caption", "joke", "essay",
        "lyrics", "song", "tweet", "description", "describe", "rhyme", "rhymes", "verse",
        "sonnet", "toast", "speech", "email", "bio", "tagline", "quote", "summary", "summarize",
        "translate", "explain", "recipe", "ecris", "ecrire", "poeme", "blague", "schreib",
        "schreibe", "gedicht", "witz", "escribe", "poema", "chiste", "carta", "scrivi",
        "poesia", "barzelletta", "escreva", "escreve", "piada", "schrijf", "grap", "напиши",
        "стих", "стихотворение", "шутку", "napisz", "wiersz", "zart", "書いて", "詩", "俳句",
    ),
    "story": (
        "story", "stories", "tale", "fable", "storybook", "picture book", "comic", "histoire",
        "conte",
        "geschichte", "bildergeschichte", "marchen", "cuento", "historia", "racconto", "storia", "fiaba", "favola",
        "verhaal", "sprookje", "prentenboek", "historinha", "сказку", "сказка", "историю",
        "opowiesc", "bajke", "bajka", "物語", "おはなし", "お話", "の話", "이야기", "동화",
    ),
    "brainstorm": (
        "ideas", "idea", "brainstorm", "options", "concepts", "suggestions", "directions",
        "come up with", "what could i", "what should i", "inspiration", "idees", "ideen",
        "vorschlage", "ideas", "sugerencias", "idee", "proposte", "ideias", "sugestoes",
        "ideeen", "идеи", "идей", "варианты", "pomysly", "pomysl", "アイデア", "案",
        "to pick from", "to choose from", "several", "a few options", "pitch me", "아이디어",
        "themes", "list some", "pomysł", "opcji",
    ),
    "help": (
        "help", "what can you do", "how does this work", "how do i use", "commands",
        "how do you work", "what do you do", "who are you", "what are you", "what else",
        "what do you support", "hilfe", "aide", "ayuda", "aiuto", "ajuda", "помощь", "pomoc", "使い方", "ヘルプ",
        "what else can you", "que sais-tu faire", "was kannst du", "que puedes hacer",
        "cosa sai fare", "o que voce faz", "wat kun je", "что ты умеешь", "co umiesz",
    ),
}
#: Words that make a story illustrated (a story without them is plain text).
_ILLUSTRATED = (
    "picture", "pictures", "pics", "illustrated", "illustrations", "illustration", "scenes",
    "scene", "images", "drawings", "panels", "picture book", "comic", "storybook", "with art",
    "illustre", "illustree", "images", "bebildert", "bildern", "bilder", "ilustrado",
    "ilustrada", "imagenes", "dibujos", "illustrata", "illustrato", "immagini", "ilustrada",
    "imagens", "geillustreerd", "plaatjes", "с картинками", "иллюстрац", "ilustrowan",
    "obrazkami", "絵本", "挿絵", "イラスト付き", "絵付き", "bildergeschichte", "prentenboek",
    "그림", "ilustrowana",
)
#: Words that take the pictures out of a story ("just text, no pictures").
_NO_PICTURES = ("no pictures", "no images", "without pictures", "without images", "just text",
                "text only", "only text", "no illustrations", "sans images", "ohne bilder",
                "sin imagenes", "senza immagini", "sem imagens", "zonder plaatjes")
#: Words that start something new even in a reply to a result.
_NEW_THING = ("different thing", "something else", "something different", "new one",
              "unrelated", "another thing", "new request", "autre chose", "etwas anderes",
              "otra cosa", "altra cosa", "outra coisa", "iets anders", "different topic",
              "new topic", "change of topic", "next one")
#: Words that mark a message as an instruction about the result it answers.
_CHANGE = (
    "make it", "make them", "make the", "make him", "make her", "more", "less", "change",
    "turn it", "turn the", "add", "remove", "same", "instead", "bigger", "smaller", "darker",
    "brighter", "lighter", "happier", "sadder", "shorter", "longer", "again", "but with",
    "as a", "as an", "in black and white", "at night", "without", "zoom", "redo", "fix",
    "try", "cut", "too ", "trim", "rends", "rendre", "en noir", "plus", "moins", "ajoute", "mach", "mehr", "weniger",
    "fuge", "hazlo", "haz", "mas", "menos", "anade", "rendilo", "rendi", "piu", "aggiungi",
    "faca", "deixa", "mais", "maak", "meer", "minder", "voeg", "сделай", "больше", "меньше",
    "zrob", "wiecej", "mniej", "にして", "もっと",
)
_PRONOUN_TARGET = re.compile(r"\b(it|this|that|them|these|the same|le|la|es|lo|het|его|её|to)\b")
_QUESTION_START = re.compile(
    r"^(who|what|why|how|when|where|which|is|are|do|does|can|could|would|should|qui|que|"
    r"quoi|pourquoi|comment|wer|was|warum|wie|quien|que|por que|como|chi|perche|cosa|"
    r"quem|porque|wie|wat|waarom|кто|что|почему|как|kto|co|dlaczego|jak)\b")
_ABOUT_THE_BOT = re.compile(
    r"^(how (do|can|should) (i|we)|is there a way|how does (the|this|it)|what (do|can) i)\b"
    r".*\b(you (already|made|make|can|do)|from you|get you|your|bot|mode|feature|"
    r"commands?|ask you)\b")
_ASKS_ABOUT = re.compile(r"^(who|what|whats|what's|why|how|when|where|which)\b")
_FILLER = re.compile(
    r"^\s*(hey|hi|hello|yo|ok|okay|please|pls|plz|can you|could you|would you|will you|"
    r"can u|could u|i want|i'd like|i would like|i need|give me|make me|make|create|"
    r"generate|do|me|us|a|an|some|now|so|and|then|bonjour|salut|hallo|hola|ciao|oi|hoi)\b[\s,!.:]*",
    re.IGNORECASE)
_WORD = re.compile(r"\w+", re.UNICODE)  # "un'immagine" is two words


def _cjk(cue: str) -> bool:
    return any(ord(c) > 0x2E80 for c in cue)


#: Cue words that typos are forgiven for. Only these: a fuzzy match between two real words of
#: other languages ("machen" and "Märchen", "art" and Polish "żart") would misroute.
_FUZZY = frozenset({
    "draw", "drawing", "paint", "painting", "picture", "image", "photo", "illustration",
    "illustrate", "sketch", "render", "portrait", "wallpaper", "imagine", "story", "stories",
    "storybook", "brainstorm", "ideas", "suggestions", "concepts", "options", "write", "poem",
    "haiku", "limerick", "slogan", "caption", "lyrics", "help", "pictures", "illustrated",
})


def _has(folded: str, words: list[str], cue: str) -> bool:
    if " " in cue or _cjk(cue):
        return cue in folded
    if cue in words:
        return True
    if not cue.isascii():
        # Cyrillic and other inflected forms: a word starting with the cue's stem counts.
        return any(w.startswith(cue[:max(4, len(cue) - 2)]) for w in words)
    if cue not in _FUZZY:
        return False
    return any(abs(len(w) - len(cue)) <= 2 and len(w) >= FUZZY_MIN_CHARS - 1
               and w[0] == cue[0]
               and difflib.SequenceMatcher(None, w, cue).ratio() >= FUZZY_RATIO
               for w in words)


def _count(folded: str, words: list[str], cues: tuple[str, ...]) -> int:
    return sum(1 for cue in cues if _has(folded, words, _fold(cue)))


def rule_scores(text: str, *, replying: bool = False) -> dict[str, float]:
    """Evidence per intent from the wording alone (0 = none; 1 = one clear cue)."""
    folded = _fold(text)
    words = _WORD.findall(folded)
    hits = {intent: _count(folded, words, cues) for intent, cues in _CUES.items()}
    illustrated = _count(folded, words, _ILLUSTRATED)
    scores = dict.fromkeys(INTENTS, 0.0)
    no_pictures = bool(_count(folded, words, _NO_PICTURES))
    if hits["story"]:
        # A story with pictures is an illustrated story; a story alone is a text.
        if not no_pictures and (illustrated or hits["imagine"]):
            scores["story"] = 1.0 + 0.5 * min(illustrated + hits["imagine"], 2)
        else:
            scores["write"] += 1.0
    if hits["brainstorm"]:
        scores["brainstorm"] = 1.0 + 0.5 * min(hits["brainstorm"] - 1, 1)
    if hits["imagine"] and not scores["story"]:
        scores["imagine"] = 1.0 + 0.25 * min(hits["imagine"] - 1, 2)
    if hits["write"]:
        scores["write"] += 1.0 + 0.25 * min(hits["write"] - 1, 2)
    if hits["help"] or _ABOUT_THE_BOT.search(folded):
        # "how does the story mode work", "is there a way to get bigger images from you?"
        scores["help"] = 1.0 if len(words) <= 8 or not hits["help"] else 0.6
        if _ABOUT_THE_BOT.search(folded):
            scores["help"] = 1.5
    if not any(scores.values()) and _QUESTION_START.match(folded.strip()):
        scores["write"] = 0.6  # a question with no other cue: the text model answers it
    elif _ASKS_ABOUT.match(folded.strip()) and not hits["help"] and not hits["brainstorm"]:
        # "how do I get better at drawing hands?" asks about pictures; it wants an answer.
        scores["write"] = max(scores["write"], 1.0 + scores["imagine"])
        scores["imagine"] = 0.0
    if replying and not _count(folded, words, _NEW_THING):
        change = _count(folded, words, _CHANGE)
        pointing = bool(_PRONOUN_TARGET.search(folded))
        asks_new = max(scores["imagine"], scores["write"], scores["story"],
                       scores["brainstorm"], scores["help"])
        if change or (pointing and asks_new < 1.0) or len(words) <= 6 and asks_new < 1.0:
            scores["refine"] = 1.0 + 0.5 * min(change, 2) + (0.25 if pointing else 0.0)
            # "make it a watercolor" names a picture word, yet changes the result.
            if pointing or change:
                for other in ("imagine", "write"):
                    scores[other] *= 0.5
    return scores


def _prompt_of(text: str, intent: str) -> str:
    """The creative prompt inside a request: "can you draw a fox" -> "a fox"."""
    if intent in ("refine", "help", "write", "brainstorm", "story"):
        return " ".join(text.split())
    rest = text
    for _ in range(4):  # peel "hey can you please draw me" one filler at a time
        stripped = _FILLER.sub("", rest, count=1)
        if stripped == rest:
            break
        rest = stripped
    verb = re.match(r"^\s*(draw|paint|sketch|render|illustrate|imagine|picture|doodle)\b"
                    r"(\s+(me|us))?(\s+(a|an)\s+(picture|image|drawing|painting|photo)\s+of)?"
                    r"[\s:,]*", rest, re.IGNORECASE)
    if verb:
        rest = rest[verb.end():]
    rest = re.sub(r"^\s*(a|an)?\s*(picture|image|drawing|painting|photo|pic)\s+of\s+", "",
                  rest, flags=re.IGNORECASE)
    rest = " ".join(rest.split())
    return rest if len(rest) >= 3 else " ".join(text.split())


def classify_rules(text: str, *, replying: bool = False) -> Understanding | None:
    """The rules' decision, or None when no clear cue routes the message (ask the model)."""
    scores = rule_scores(text, replying=replying)
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    (best, top), (_, second) = ranked[0], ranked[1]
    if top < RULES_ROUTE_AT or top - second < 0.5:
        return None
    confidence = min(0.97, 0.6 + 0.25 * (top - second))
    return Understanding(best, confidence, "rules", _prompt_of(text, best), scores)


#: What the text model is asked to complete, per intent: the label it should say.
LABEL_WORDS: dict[str, str] = {
    "imagine": "picture", "write": "text", "story": "story", "brainstorm": "ideas",
    "refine": "change", "help": "help",
}


def model_messages(text: str, *, replying: bool) -> list[dict[str, str]]:
    """The chat the worker scores: the model completes it with one of :data:`LABEL_WORDS`."""
    context = ("The message replies to a result the bot made."
               if replying else "The message is a new request.")
    labels = ", ".join(LABEL_WORDS.values())
    system = (
        "You sort chat messages sent to a creative bot. Answer with one word: picture (they "
        "want an image drawn), text (they want writing, or ask a question), story (they want "
        "an illustrated story with pictures), ideas (they want several ideas to choose from), "
        "change (they want the bot's last result changed), help (they ask what the bot can "
        f"do). Labels: {labels}.")
    examples = [
        ("draw a cat on a roof", False, "picture"), ("write a poem about the sea", False, "text"),
        ("a story about a brave mouse, with pictures", False, "story"),
        ("give me ideas for a party flyer", False, "ideas"),
        ("make it darker", True, "change"), ("what can you do?", False, "help"),
    ]
    messages = [{"role": "system", "content": system}]
    for sample, sample_replying, label in examples:
        note = "(reply to a result) " if sample_replying else ""
        messages += [{"role": "user", "content": f"{note}{sample}"},
                     {"role": "assistant", "content": label}]
    note = "(reply to a result) " if replying else ""
    messages.append({"role": "user", "content": f"{note}{text}\n{context}"})
    return messages


#: How much the rules' weak evidence counts against the model's log-probabilities.
RULES_WEIGHT = 2.0
#: A lean towards an answer in text: chat nobody can place ("lol ur funny") is for the text
#: model to answer, as it always was; the model must be clearly surer of something else.
PRIOR: dict[str, float] = {"write": 1.0}


def combine(text: str, model_logprobs: Mapping[str, float], *,
            replying: bool) -> Understanding:
    """The model's label log-probabilities plus the rules' evidence, as one decision.

    ``model_logprobs`` maps intents to the log-probability the model gives its label. Refine is
    impossible when the message replies to nothing.
    """
    scores = rule_scores(text, replying=replying)
    logits = {intent: model_logprobs.get(intent, -30.0) + RULES_WEIGHT * scores[intent]
              + PRIOR.get(intent, 0.0) for intent in INTENTS}
    if not replying or _count(_fold(text), _WORD.findall(_fold(text)), _NEW_THING):
        logits["refine"] = -math.inf  # nothing to change, or "a different thing now"
    top = max(logits.values())
    weights = {k: math.exp(v - top) for k, v in logits.items()}
    total = sum(weights.values())
    probabilities = {k: w / total for k, w in weights.items()}
    best = max(probabilities, key=probabilities.__getitem__)
    return Understanding(best, probabilities[best], "model", _prompt_of(text, best),
                         probabilities)
