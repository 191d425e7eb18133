"""The workspace controller: node selection, Machines, inference workloads, status."""
