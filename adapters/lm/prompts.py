"""The plain completion layout for questions and answers: what O3 trains its forget pairs in when a request names
bare questions, alongside the model's own chat template (adapters.lm.loading.question_layouts)."""

PROMPT = "Question: {question}\nAnswer:"


def format_prompt(question: str) -> str:
    """The one prompt layout used for teaching, unlearning and evaluation."""
    return PROMPT.format(question=question)
