"""``islet-imaging stages``: list the stage profiles, show one, or print it as editable TOML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from islet_imaging.stages import StageProfile, load_stages, profile_to_toml

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "format_profile", "format_summary", "run"]

HELP = "list the differentiation stage profiles, or show one (as text or TOML)"

DESCRIPTION = """\
List the stage profiles (markers with their compartment, cluster kind, QC targets), or show one.

Examples:
  islet-imaging stages                      # all stages, in differentiation order
  islet-imaging stages S4                   # one stage in detail (name or alias, any case)
  islet-imaging stages sc-islet --toml > my_stages.toml
                                            # a profile as TOML: edit it, then load it back with
  islet-imaging stages --stages my_stages.toml
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``stages`` options to ``parser``."""
    parser.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="a stage name or alias (ipsc, S4, SC-islet, ...); omit it to list every stage",
    )
    parser.add_argument(
        "--stages",
        metavar="FILE",
        type=Path,
        help="TOML file with [stages.<name>] tables that override or add stage profiles",
    )
    parser.add_argument(
        "--toml",
        action="store_true",
        help="print the profile(s) as TOML, ready to edit and load back with --stages",
    )


def format_summary(profile: StageProfile) -> str:
    """A few lines on one stage: name, aliases, cluster kind, markers and QC targets."""
    aliases = f" ({', '.join(profile.aliases)})" if profile.aliases else ""
    markers = ", ".join(f"{m.name} [{m.compartment}]" for m in profile.markers) or "-"
    qc = "; ".join(t.describe() for t in profile.qc_targets) or "-"
    return (
        f"{profile.name}{aliases}: {profile.cluster_kind}\n  markers: {markers}\n  QC:      {qc}\n"
    )


def format_profile(profile: StageProfile) -> str:
    """Everything about one stage, in words."""
    lines = [
        f"{profile.name}" + (f" ({', '.join(profile.aliases)})" if profile.aliases else ""),
        f"  {profile.description}" if profile.description else "",
        f"  order:                {profile.order}",
        f"  cluster kind:         {profile.cluster_kind} (outlined from: {profile.cluster_input})",
        f"  nuclear stain:        {profile.nuclear_stain}",
        f"  nucleus diameter:     {profile.nucleus_diameter_um[0]:g}-"
        f"{profile.nucleus_diameter_um[1]:g} µm",
        f"  min cluster diameter: {profile.min_cluster_diameter_um:g} µm",
        "  markers:",
    ]
    for m in profile.markers:
        aliases = f" (also: {', '.join(m.aliases)})" if m.aliases else ""
        desc = f" - {m.description}" if m.description else ""
        lines.append(f"    {m.name} [{m.compartment}]{aliases}{desc}")
    if profile.double_positives:
        lines.append(f"  double positives: {', '.join(profile.double_positives)}")
    lines.append("  QC targets:")
    for t in profile.qc_targets:
        desc = f" - {t.description}" if t.description else ""
        lines.append(f"    {t.describe()}{desc}")
        if t.source:
            lines.append(f"      source: {t.source}")
    if not profile.qc_targets:
        lines.append("    (none)")
    return "\n".join(line for line in lines if line) + "\n"


def run(args: argparse.Namespace) -> int:
    """List, show or print as TOML the stage profiles; 0 on success."""
    registry = load_stages(args.stages)
    if args.name:
        profiles = [registry.get(args.name)]
    else:
        profiles = sorted(registry, key=lambda p: p.order)
    if args.toml:
        text = "\n".join(profile_to_toml(p) for p in profiles)
    elif args.name:
        text = format_profile(profiles[0])
    else:
        text = "\n".join(format_summary(p) for p in profiles)
        text += "\nDetails: islet-imaging stages NAME; editable TOML: islet-imaging stages NAME --toml\n"
    sys.stdout.write(text)
    return 0
