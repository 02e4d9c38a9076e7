"""`python -m synernet.data sbd|labels|coco|synthetic|check ...`: the data preparation commands (`synernet.data.datasets.main`)."""
from synernet.data.datasets import main

if __name__ == "__main__": main()
