from bench.http.runner import main

raise SystemExit(main())
