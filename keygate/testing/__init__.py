"""Test helpers shipped with keygate: throwaway servers and fakes for the suites."""
