"""Write tools/plots/dvc_plots.html: DVC's plots page with Vega, Vega-Lite and vega-embed inlined from
node_modules (`npm ci --prefix tools/plots`), so that `dvc plots show` draws every chart without a network.
DVC's own page loads them from a CDN and, offline, leaves every Vega chart blank without a word.
`make setup` runs this and points DVC at the page (`dvc config --local plots.html_template`)."""

from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")
# DVC fills {refresh_tag} and {plot_divs}; without a {scripts} slot it adds no CDN <script> tags.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- Vega, Vega-Lite and vega-embed (BSD-3-Clause), inlined by tools/plots/build.py -->
%s
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> None:
    scripts = []
    for rel in SCRIPTS:
        js = (HERE / "node_modules" / rel).read_text(encoding="utf8")
        if "</script" in js or any(f"{{{slot}}}" in js for slot in ("plot_divs", "refresh_tag", "scripts")):
            raise SystemExit(f"{rel} cannot be inlined as it is (it holds '</script' or a DVC slot)")
        scripts.append(f"    <script>{js}</script>")
    out = HERE / "dvc_plots.html"
    out.write_text(PAGE % "\n".join(scripts), encoding="utf8")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
