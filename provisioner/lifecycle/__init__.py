"""Machine lifecycle: launch, registration, initialization and termination (``reconciler``), the
conditions it reports (``conditions``), Node checks (``nodes``) and its wiring into a Manager (``setup``)."""
