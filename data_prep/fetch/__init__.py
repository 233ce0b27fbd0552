"""Getting the bytes behind a URL or path, under the fetch safety rules."""
