"""Whether and when a request may go: admission scheduler, queue policies, the adaptive switcher and the service-time estimate."""
