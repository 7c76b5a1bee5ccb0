/**
 * Symbol.dispose / Symbol.asyncDispose for `using` and `await using`. Node.js 20 defines them on
 * its main realm; other realms (a vm context, a test sandbox) may lack them, and a class method
 * named by an undefined symbol would silently be called "undefined".
 */
const S = Symbol as unknown as { dispose?: symbol; asyncDispose?: symbol };
S.dispose ??= Symbol.for("nodejs.dispose");
S.asyncDispose ??= Symbol.for("nodejs.asyncDispose");
export {};
