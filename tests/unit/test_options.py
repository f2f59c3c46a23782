"""Options of ``App.loop``: every one listed in help, a misspelt one named with the right word."""

from __future__ import annotations

import pydoc

import pytest

import ostinato
from ostinato.errors import DeclarationError
from ostinato.loop import OPTIONS, Pass, declare


def test_a_misspelt_option_names_the_loop_and_the_right_word() -> None:
    """``evry=`` is refused at declaration, naming the loop and suggesting ``every=``."""
    app = ostinato.App("typos")
    with pytest.raises(DeclarationError, match=r"loop 'tick', evry=: no such option; did you mean every=\?"):

        @app.loop(evry="1s")  # type: ignore[call-overload]
        def tick(ctx: Pass) -> None: ...

    with pytest.raises(DeclarationError, match="the options are name, every, pause"):

        @app.loop(colour="red")  # type: ignore[call-overload]
        def tock(ctx: Pass) -> None: ...


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_fail_after_is_a_whole_number_of_passes(value: object) -> None:
    with pytest.raises(DeclarationError, match="fail_after="):
        declare(lambda ctx: None, name="x", fail_after=value)  # type: ignore[arg-type]


def test_help_lists_every_option() -> None:
    """``help(App.loop)`` shows each option by name with a line saying what it does."""
    text = pydoc.render_doc(ostinato.App.loop, renderer=pydoc.plaintext)
    for option in OPTIONS:
        assert f"{option}:" in text or f"``{option}``" in text, option
    assert "**options" not in text
