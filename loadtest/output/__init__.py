"""Layer 2: reports (Markdown) and plots (PNG) of saved results. Imports core and server."""
