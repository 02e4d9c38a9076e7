"""Refresh the resolved phase table shown in nbs/90_api.ipynb (the output of its phase-table cell).

The table is computed from the preset and method registries by `synernet.core.config.phase_table`; this script stores that
output in the notebook, so that the table can be read without running it. `tests/test_schedules.py` fails when the
stored table is not the registry's. Usage: `python tools/phase_table.py` (from the repository root).
"""
import json
from pathlib import Path

import synernet.core.config as sc

NB = Path(__file__).resolve().parents[1] / "nbs" / "90_api.ipynb"


def main():
    md = sc.phase_table_markdown(sc.phase_table())
    nb = json.loads(NB.read_text())
    cell = next(c for c in nb["cells"] if "phase_table_markdown(sc.phase_table())" in "".join(c["source"]))
    cell["outputs"] = [dict(output_type="execute_result", execution_count=None, metadata={},
                            data={"text/markdown": md.splitlines(keepends=True), "text/plain": ["<IPython.core.display.Markdown object>"]})]
    NB.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    print(md)


if __name__ == "__main__":
    main()
