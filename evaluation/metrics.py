"""The metrics of the paper's task families, implemented once.

- VQA: the standard soft accuracy over (usually 10) human answers, and exact match, after the usual answer
  normalisation (case, punctuation, articles, number words).
- Multiple choice (MMBench, SEED, ScienceQA, AI2D...): the option a free-text answer picks, then accuracy.
- Yes/no (MME): `acc` per question and `acc+` per image (both of its questions right).
- ChartQA: relaxed accuracy (numbers within 5%, other answers exact).
- DocVQA: ANLS (average normalised Levenshtein similarity, threshold 0.5).
- Captioning: BLEU-4 and CIDEr(-D) from `pycocoevalcap`, the COCO caption evaluation package.
- Grounding: accuracy at IoU > 0.5 of the first box written in the generated text.
- Retrieval: recall at 1, 5, 10, image-to-text and text-to-image, from a similarity matrix.
"""

import re
from collections.abc import Sequence

import torch

NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate("zero one two three four five six seven eight nine ten".split())  # as the VQA eval does
}
ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[^\w\s.]|(?<!\d)\.|\.(?!\d)")  # punctuation, keeping decimal points


def normalize_answer(text: str) -> str:
    """Lower case, punctuation dropped (decimal points kept), number words as digits, articles dropped."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy: min(1, matching humans / 3), averaged over the leave-one-annotator-out subsets."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer.")
    predicted = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in answers]
    if len(humans) == 1:
        return float(predicted == humans[0])
    scores = [min(1.0, sum(h == predicted for j, h in enumerate(humans) if j != i) / 3) for i in range(len(humans))]
    return sum(scores) / len(scores)


# --- multiple choice and yes/no ----------------------------------------------------------------------------


def extract_option(text: str, options: Sequence[str]) -> str | None:
    """The option letter (A, B, ...) a free-text answer picks, or None when it picks none or several.

    Understands "B", "(B)", "B.", "B) text", "The answer is B", and the option's own text ("a red circle")."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    stripped = text.strip()
    lead = re.match(r"^\(?([A-Z])(?:[).:,]|\s|$)", stripped)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    stated = re.search(r"answer is:?\s*\(?([A-Z])\b", stripped, flags=re.IGNORECASE)
    if stated and stated.group(1).upper() in letters:
        return stated.group(1).upper()
    alone = {m for m in re.findall(r"(?<![\w'])([A-Z])(?![\w'])", stripped) if m in letters}
    if len(alone) == 1:
        return alone.pop()
    said = normalize_answer(stripped)
    named = [letter for letter, option in zip(letters, options, strict=True) if normalize_answer(option) in said]
    if len(named) > 1:  # an option whose text holds another's ("red circle" / "circle"): the longest one
        longest = max(named, key=lambda letter: len(options[letters.index(letter)]))
        others = [letter for letter in named if letter != longest]
        if all(
            normalize_answer(options[letters.index(o)]) in normalize_answer(options[letters.index(longest)])
            for o in others
        ):
            return longest
        return None
    return named[0] if named else None


def multiple_choice_accuracy(predictions: Sequence[str], options: Sequence[Sequence[str]], answers: Sequence[str]):
    """Share of questions whose extracted option is the answer letter (no option extracted counts as wrong)."""
    picks = [extract_option(p, o) for p, o in zip(predictions, options, strict=True)]
    return sum(pick == answer.strip().upper() for pick, answer in zip(picks, answers, strict=True)) / len(answers)


def yes_no(text: str) -> str | None:
    """ "yes" or "no" when the answer starts with one of them, else None."""
    first = normalize_answer(text).split()[:1]
    return first[0] if first and first[0] in ("yes", "no") else None


def mme_scores(image_ids: Sequence, predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """MME: `acc` over questions and `acc_plus` over images (every question of the image right), in [0, 1]."""
    right = [yes_no(p) == a.strip().lower() for p, a in zip(predictions, answers, strict=True)]
    per_image: dict = {}
    for image_id, ok in zip(image_ids, right, strict=True):
        per_image.setdefault(image_id, []).append(ok)
    return {
        "acc": sum(right) / len(right),
        "acc_plus": sum(all(oks) for oks in per_image.values()) / len(per_image),
    }


# --- ChartQA and DocVQA ------------------------------------------------------------------------------------


def _number(text: str) -> float | None:
    cleaned = text.strip().rstrip("%").replace(",", "").replace("$", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA: a numeric answer is right within `tolerance` relative error, anything else on exact match."""
    predicted, target = _number(prediction), _number(answer)
    if predicted is not None and target is not None:
        if target == 0:
            return float(predicted == 0)
        return float(abs(predicted - target) / abs(target) <= tolerance)
    return float(prediction.strip().lower() == answer.strip().lower())


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA's ANLS for one question: the best 1 - normalised edit distance over the answers, 0 below threshold."""
    predicted = " ".join(prediction.lower().split())
    best = 0.0
    for answer in answers:
        target = " ".join(answer.lower().split())
        distance = levenshtein(predicted, target) / max(len(predicted), len(target), 1)
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


# --- captioning --------------------------------------------------------------------------------------------


def caption_scores(predictions: dict, references: dict) -> dict[str, float]:
    """BLEU-4 and CIDEr(-D) of {id: caption} against {id: [reference captions]}, with COCO's scorers on
    lower-cased, punctuation-free words (what COCO's PTB tokenizer yields for plain sentences, without Java)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        raise ValueError("predictions and references must cover the same ids.")

    def tokens(text: str) -> str:
        return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())

    candidates = {key: [tokens(text)] for key, text in predictions.items()}
    golds = {key: [tokens(text) for text in texts] for key, texts in references.items()}
    bleu, _ = Bleu(4).compute_score(golds, candidates, verbose=0)
    cider, _ = Cider().compute_score(golds, candidates)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


# --- grounding ---------------------------------------------------------------------------------------------

_BOX = re.compile(r"\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]")


def parse_boxes(text: str) -> list[list[float]]:
    """Boxes written as "[x0, y0, x1, y1]" in generated text, in order."""
    boxes = []
    for match in _BOX.finditer(text):
        try:
            boxes.append([float(v) for v in match.groups()])
        except ValueError:  # "1.2.3"
            continue
    return boxes


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(predictions: Sequence[str], targets: Sequence[Sequence[float]], threshold: float = 0.5):
    """Share of predictions whose first written box overlaps its target box with IoU > threshold."""
    hits = 0
    for text, target in zip(predictions, targets, strict=True):
        boxes = parse_boxes(text)
        hits += bool(boxes) and box_iou(boxes[0], target) > threshold
    return hits / len(targets)


# --- retrieval ---------------------------------------------------------------------------------------------


def retrieval_recall(similarity: torch.Tensor, text_to_image: Sequence, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways from a [num_images, num_texts] similarity matrix. `text_to_image[t]` is text t's image,
    or a list of images when one text belongs to several (two images with the same caption).

    Image to text: an image counts when any of its texts ranks in its top k. Text to image: a text counts when one
    of its images ranks in its top k."""
    num_images, num_texts = similarity.shape
    owners = [[o] if isinstance(o, int) else list(o) for o in text_to_image]
    if len(owners) != num_texts or not all(owners) or any(not 0 <= o < num_images for os_ in owners for o in os_):
        raise ValueError(
            f"text_to_image must give one or more image indices in [0, {num_images}) for each of {num_texts} texts."
        )
    correct = torch.zeros(num_images, num_texts, dtype=torch.bool, device=similarity.device)  # [I, T]
    for text, images in enumerate(owners):
        correct[images, text] = True
    if not correct.any(dim=1).all():
        raise ValueError("every image needs at least one text in text_to_image.")
    text_order = similarity.argsort(dim=1, descending=True)  # texts per image, best first
    first_text = correct.gather(1, text_order).float().argmax(dim=1)  # rank of the first correct text
    image_order = similarity.t().argsort(dim=1, descending=True)  # images per text, best first
    first_image = correct.t().gather(1, image_order).float().argmax(dim=1)  # rank of the first correct image
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float((first_text < k).float().mean())
        out[f"t2i_r@{k}"] = float((first_image < k).float().mean())
    return out


__all__ = [
    "anls",
    "box_iou",
    "caption_scores",
    "exact_match",
    "extract_option",
    "grounding_accuracy",
    "mme_scores",
    "multiple_choice_accuracy",
    "normalize_answer",
    "parse_boxes",
    "relaxed_accuracy",
    "retrieval_recall",
    "vqa_accuracy",
    "yes_no",
]
