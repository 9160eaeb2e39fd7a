// Parses an HTTP message ({headers, body} as JSON on stdin) with the npm `cloudevents` SDK.
// Prints the event (attributes, extensions and data) as JSON; a message that is not a valid
// CloudEvent makes HTTP.toEvent throw, and this script exit non-zero.
import { HTTP } from "cloudevents";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { headers, body } = JSON.parse(input);
console.log(JSON.stringify(HTTP.toEvent({ headers, body })));
