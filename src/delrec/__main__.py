"""`python -m delrec …` (also what `accelerate launch -m delrec …` runs)."""

from delrec.cli import main

main()
