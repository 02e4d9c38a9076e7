"""`python -m synernet.core --preset P [--key value ...]`: resolve a config, check its phases, create its run folder and
print the config (`synernet.core.config.main`; `import synernet` has registered every method first)."""
from synernet.core.config import main

if __name__ == "__main__": main()
