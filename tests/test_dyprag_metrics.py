"""EM/F1 as the PRAG/DyPRAG evaluation computes them: hand-computed values on the edge cases."""

from __future__ import annotations

import pytest

from dyprag.scoring import evaluate, exact_match, extract_answer, f1_score, normalize_answer


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower!", "eiffel tower"),          # article and punctuation
    ("  Paris \t France\n", "paris france"),        # whitespace collapsed
    ("an apple a day", "apple day"),                # every article, as whole words only
    ("Theatre of Anthems", "theatre of anthems"),   # "the"/"an" inside words stay
    ("U.S.A.", "usa"),                              # punctuation removed before articles
    ("Rock 'n' Roll", "rock n roll"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, gold, em", [
    ("the Eiffel Tower", ["Eiffel Tower"], 1.0),
    ("a cat.", "The Cat", 1.0),                     # a single string gold is one alias
    ("NYC", ["New York City", "NYC"], 1.0),         # any alias
    ("New York", ["New York City", "NYC"], 0.0),
    ("", ["Paris"], 0.0),                           # empty prediction
    ("yes", ["Yes"], 1.0),
])
def test_exact_match(prediction, gold, em):
    assert exact_match(prediction, gold) == em


@pytest.mark.parametrize("prediction, gold, expected", [
    # 2 of 3 gold tokens: precision 1, recall 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    ("new york", ["New York City"], (0.8, 1.0, 2 / 3)),
    # best alias: vs "obama" F1 0.5; vs "barack obama" p 2/3, r 1, F1 0.8
    ("Barack Obama Jr", ["Obama", "Barack Obama"], (0.8, 2 / 3, 1.0)),
    # precision and recall are maximised over aliases separately (the original's quirk):
    # "john": p 1/2 r 1; "john smith jones": p 1 r 2/3 (F1 0.8)
    ("john smith", ["John", "John Smith Jones"], (0.8, 1.0, 1.0)),
    # articles do not count as tokens: "the cat sat" vs "a cat" -> cat sat / cat: p 1/2 r 1
    ("the cat sat", ["a cat"], (2 / 3, 0.5, 1.0)),
    ("", ["Paris"], (0.0, 0.0, 0.0)),               # empty prediction scores nothing
    ("London", ["Paris"], (0.0, 0.0, 0.0)),
])
def test_f1_score(prediction, gold, expected):
    assert f1_score(prediction, gold) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, gold, expected_f1", [
    ("no", ["yes"], 0.0),
    ("yes", ["yes"], 1.0),
    ("yes it is", ["yes"], 0.0),       # plain overlap would give 0.5; a yes/no gold needs exactly yes/no
    ("no", ["no way"], 0.0),           # a yes/no prediction only matches the same word (overlap: 2/3)
    ("noanswer", ["no answer"], 0.0),
    ("Yes.", ["yes", "Barack Obama"], 1.0),
])
def test_yes_no_gets_no_partial_credit(prediction, gold, expected_f1):
    assert f1_score(prediction, gold)[0] == pytest.approx(expected_f1)


@pytest.mark.parametrize("generation, with_cot, expected", [
    (" Paris. It is the capital of France.", False, "Paris"),
    ("Paris\nQuestion: next", False, "Paris"),
    ("Yes, he was born there.", False, "Yes"),
    ("1,000 people", False, "1"),  # the original cuts at the first comma, numbers included
    ("Einstein was born in Ulm. So the answer is Germany.", True, "Germany"),
    ("No marker here, sorry.", True, "No marker here"),
    ("", False, ""),
])
def test_extract_answer(generation, with_cot, expected):
    assert extract_answer(generation, with_cot) == expected


def test_evaluate_scores_the_extracted_span():
    score = evaluate("Yes, he was born in Ulm.", ["yes"])
    assert (score.prediction, score.em, score.f1) == ("Yes", 1.0, 1.0)
    score = evaluate("The Rirderkkoum Republic. Bye", ["Rirderkkoum"])
    assert score.em == 0.0 and score.f1 == pytest.approx(2 / 3)  # tokens rirderkkoum republic vs rirderkkoum
    assert evaluate("", ["Paris"]).em == 0.0
    with pytest.raises(ValueError, match="gold"):
        evaluate("Paris", [])
