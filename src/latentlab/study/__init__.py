"""Study tooling: sweeps, reports, analyses and the demo. It reaches methods and tasks through
their contracts only (`Method`, `Task`) and the recipes; it names no method."""
