"""`python -m neuronscope` runs the CLI."""
from .cli import main

main()
